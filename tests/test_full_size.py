"""Full SD v1.4 size, random weights: the loaders and the whole model agree with diffusers/transformers (slow: ~4 GB
per model copy, a few minutes on 2 cores). Run with `make test-slow` or `pytest -m slow tests/test_full_size.py`."""
import pytest
import torch
from safetensors.torch import save_file

import minidiff
from sd_fixtures import SD14_TEXT, SD14_UNET, SD14_VAE, VOCAB, compvis_state_dict

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sd14():
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
    torch.manual_seed(0)
    return StableDiffusionPipeline(
        unet=UNet2DConditionModel(**SD14_UNET).eval(), vae=AutoencoderKL(**SD14_VAE).eval(),
        text_encoder=CLIPTextModel(CLIPTextConfig(**SD14_TEXT)).eval(),
        tokenizer=CLIPTokenizer(str(VOCAB / "vocab.json"), str(VOCAB / "merges.txt"), model_max_length=77),
        scheduler=PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def _compare(pipe, dpipe):
    g = torch.Generator().manual_seed(0)
    ids = pipe.tokenizer(["a photograph of an astronaut riding a horse", "A Pokémon cellphone"])
    latents = torch.randn(2, 4, 32, 32, generator=g)
    images = torch.rand(1, 3, 64, 64, generator=g) * 2 - 1
    with torch.no_grad():
        ctx = dpipe.text_encoder(ids).last_hidden_state
        torch.testing.assert_close(pipe.text_encoder(ids), ctx, rtol=1e-4, atol=1e-4)
        ref = dpipe.unet(latents, torch.tensor([999, 10]), ctx).sample
        out = pipe.unet(latents, torch.tensor([999, 10]), ctx)
        assert (out - ref).abs().max() <= 1e-4 * ref.abs().max()
        torch.testing.assert_close(pipe.vae.encode(images).mean, dpipe.vae.encode(images).latent_dist.mean,
                                   rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(pipe.vae.decode(latents[:1, :, :8, :8]), dpipe.vae.decode(latents[:1, :, :8, :8]).sample,
                                   rtol=1e-4, atol=1e-4)


def test_compvis_file_at_full_size(tmp_path, sd14):
    path = tmp_path / "sd-v1-4.safetensors"
    sd = compvis_state_dict(sd14)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    del sd
    pipe = minidiff.load(path)
    assert pipe.unet.config.block_out_channels == (320, 640, 1280, 1280) and pipe.unet.config.heads == 8
    assert pipe.text_encoder.config.num_attention_heads == 12
    _compare(pipe, sd14)


def test_diffusers_folder_at_full_size(tmp_path, sd14):
    sd14.save_pretrained(str(tmp_path / "sd"))
    pipe = minidiff.load(tmp_path / "sd")
    _compare(pipe, sd14)
