"""A fine-tune exported by minidiff is usable elsewhere: the CompVis single file (what AUTOMATIC1111 and ComfyUI load)
loads with diffusers' from_single_file, the diffusers folder with from_pretrained, and both give minidiff's image."""
import pytest
import torch

import minidiff
from interop_helpers import TOL, load_diffusers, ours, shared_folder, theirs
from minidiff.lora import TEXT_ENCODER_TARGETS, UNET_TARGETS, inject_lora, lora_layers, merge_lora


@pytest.fixture(scope="module")
def tuned():
    """A "fine-tuned" tiny model: LoRA on the U-Net and text encoder with random B, merged into the weights (what
    minidiff finetune --train lora exports), and its diffusers folder of origin (for the config from_single_file
    needs offline)."""
    folder = shared_folder()
    pipe = minidiff.load(folder)
    g = torch.Generator().manual_seed(4)
    for net, targets in [(pipe.unet, UNET_TARGETS), (pipe.text_encoder, TEXT_ENCODER_TARGETS)]:
        inject_lora(net, rank=4, alpha=4, targets=targets)
        with torch.no_grad():
            for m in lora_layers(net).values():
                m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.2)
    merge_lora(pipe)
    return pipe, folder


def test_compvis_export_loads_in_diffusers_from_single_file(tuned, tmp_path):
    from diffusers import StableDiffusionPipeline
    pipe, folder = tuned
    image = ours(pipe)
    assert (image - ours(minidiff.load(folder))).abs().max() > 0.05   # the fine-tune changed the model
    path = minidiff.save(pipe, tmp_path / "tuned.safetensors", format="compvis")
    dpipe = StableDiffusionPipeline.from_single_file(str(path), config=str(folder), local_files_only=True,
                                                     safety_checker=None)
    dpipe.set_progress_bar_config(disable=True)
    torch.testing.assert_close(theirs(dpipe), image, **TOL)


def test_diffusers_export_loads_with_from_pretrained(tuned, tmp_path):
    pipe, _ = tuned
    minidiff.save(pipe, tmp_path / "tuned")
    torch.testing.assert_close(theirs(load_diffusers(tmp_path / "tuned")), ours(pipe), **TOL)
