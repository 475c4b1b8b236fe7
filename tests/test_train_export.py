"""minidiff.train.export: the output of a run is a diffusers folder that minidiff and diffusers both load, holding the
trained U-Net and the frozen parts unchanged; --export-compvis writes the same weights as one CompVis file.
(LoRA files: tests/test_lora.py; textual-inversion embeddings: tests/test_textual_inversion.py.)"""
import json

import torch
from PIL import Image
from safetensors.torch import load_file

import minidiff
from minidiff.train import train
from tiny_runs import cfg_for


def test_output_loads_in_minidiff_and_diffusers(tiny, tmp_path):
    """OUT is a diffusers folder (diffusers' StableDiffusionPipeline loads it, extra files and all) holding the
    trained U-Net; the frozen VAE and text encoder are written unchanged; --export-compvis writes the same weights."""
    from diffusers import StableDiffusionPipeline
    out = tmp_path / "out"
    train(cfg_for(tiny, out, steps=2, export_compvis=True, checkpoint_every=2, validation_prompts=["a red circle"],
                  validation_seeds=(0, 1), validation_steps=2))
    base, ours, compvis = minidiff.load(tiny["model"]), minidiff.load(out), minidiff.load(out / "model.safetensors")
    trained = load_file(str(out / "checkpoints" / "step-000002" / "trainable.safetensors"))
    assert trained.keys() == ours.unet.state_dict().keys()
    for k, v in ours.unet.state_dict().items():
        assert torch.equal(v, trained[k]) and torch.equal(v, compvis.unet.state_dict()[k])
    assert any(not torch.equal(v, base.unet.state_dict()[k]) for k, v in ours.unet.state_dict().items())
    for part in ("vae", "text_encoder"):
        for k, v in getattr(ours, part).state_dict().items():
            assert torch.equal(v, getattr(base, part).state_dict()[k]), (part, k)

    dpipe = StableDiffusionPipeline.from_pretrained(str(out), safety_checker=None)
    theirs = dpipe.unet.state_dict()
    for k, v in ours.unet.state_dict().items():
        assert torch.equal(theirs[k], v), k
    # the PNGs: a validation grid at the checkpoint, and the loss curve
    grid = Image.open(out / "validation" / "step-000002.png")
    assert grid.size[0] > 2 * 128 and grid.size[1] > 128
    assert Image.open(out / "loss.png").size == (720, 360)
    assert json.loads((out / "finetune_config.json").read_text())["steps"] == 2
