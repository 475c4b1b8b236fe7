"""Loading every published SD v1 layout, saving, and refusing bad input — on tiny random-weight models whose files are
written by diffusers/transformers themselves (or, for CompVis, checked against diffusers' single-file converter)."""
import sys
import types

import pytest
import torch
from safetensors.torch import load_file, save_file

import minidiff
from minidiff import CheckpointError
from sd_fixtures import (compvis_state_dict, make_diffusers_pipe, to_2022_spelling, write_diffusers, write_json)

TOL = dict(rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def dpipe():
    return make_diffusers_pipe(0)


@pytest.fixture(scope="module")
def inputs(dpipe):
    g = torch.Generator().manual_seed(1)
    ids = dpipe.tokenizer(["a toucan", "A Pokémon cellphone"], padding="max_length", max_length=77,
                          truncation=True, return_tensors="pt").input_ids
    return dict(ids=ids, latents=torch.randn(2, 4, 8, 8, generator=g), t=torch.tensor([10, 980]),
                images=torch.rand(2, 3, 16, 16, generator=g) * 2 - 1, ctx=torch.randn(2, 77, 64, generator=g))


def assert_same_model(pipe, dpipe, inputs):
    """Each component of a loaded minidiff model computes what the diffusers/transformers component computes."""
    with torch.no_grad():
        torch.testing.assert_close(pipe.text_encoder(inputs["ids"]),
                                   dpipe.text_encoder(inputs["ids"]).last_hidden_state, **TOL)
        torch.testing.assert_close(pipe.unet(inputs["latents"], inputs["t"], inputs["ctx"]),
                                   dpipe.unet(inputs["latents"], inputs["t"], inputs["ctx"]).sample, **TOL)
        torch.testing.assert_close(pipe.vae.encode(inputs["images"]).mean,
                                   dpipe.vae.encode(inputs["images"]).latent_dist.mean, **TOL)
        torch.testing.assert_close(pipe.vae.decode(inputs["latents"]),
                                   dpipe.vae.decode(inputs["latents"]).sample, **TOL)


# ---------------------------------------------------------------------------------------------- diffusers folders
@pytest.mark.parametrize("safetensors", [True, False], ids=["safetensors", "bin"])
@pytest.mark.parametrize("spelling", ["today", "2022"])
def test_diffusers_folder(tmp_path, dpipe, inputs, safetensors, spelling):
    folder = write_diffusers(dpipe, tmp_path / "sd", safetensors=safetensors)
    if spelling == "2022":
        to_2022_spelling(folder)
        text = (load_file(str(folder / "text_encoder" / "model.safetensors")) if safetensors else
                torch.load(folder / "text_encoder" / "pytorch_model.bin", weights_only=True))
        assert "text_model.final_layer_norm.weight" in text
        vae = (load_file(str(folder / "vae" / "diffusion_pytorch_model.safetensors")) if safetensors else
               torch.load(folder / "vae" / "diffusion_pytorch_model.bin", weights_only=True))
        assert any(".attentions.0.query." in k for k in vae) and not any(".to_q." in k for k in vae)
    pipe = minidiff.load(folder)
    assert pipe.scheduler_config["beta_schedule"] == "scaled_linear"
    assert torch.equal(pipe.tokenizer(["a toucan"]), inputs["ids"][:1])
    assert_same_model(pipe, dpipe, inputs)


# ---------------------------------------------------------------------------------------------- CompVis files
def test_compvis_names_agree_with_diffusers_converter(dpipe):
    """Our CompVis key rules, read back by diffusers' own LDM converter, give diffusers' state_dicts exactly."""
    from diffusers.loaders.single_file_utils import (convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint,
                                                     convert_ldm_vae_checkpoint)
    sd = compvis_state_dict(dpipe)
    unet = convert_ldm_unet_checkpoint(sd, dict(dpipe.unet.config))
    ref = dpipe.unet.state_dict()
    assert set(unet) == set(ref)
    assert all(torch.equal(unet[k], ref[k]) for k in ref)
    vae = convert_ldm_vae_checkpoint(sd, dict(dpipe.vae.config))
    ref = dpipe.vae.state_dict()
    assert set(vae) == set(ref)
    assert all(torch.equal(vae[k].reshape(ref[k].shape), ref[k]) for k in ref)
    text = convert_ldm_clip_checkpoint(sd)
    ref = {("text_model." + k if not k.startswith("text_model.") else k): v
           for k, v in dpipe.text_encoder.state_dict().items()}
    assert all(torch.equal(text[k], ref[k]) for k in ref)


def test_compvis_ema_names_agree_with_diffusers_converter(dpipe):
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
    ema = {k: v + 1.0 for k, v in dpipe.unet.state_dict().items()}
    sd = compvis_state_dict(dpipe, ema_unet=ema)
    unet = convert_ldm_unet_checkpoint(sd, dict(dpipe.unet.config), extract_ema=True)
    assert all(torch.equal(unet[k], ema[k]) for k in ema)


@pytest.mark.parametrize("suffix", [".ckpt", ".safetensors"])
def test_compvis_file(tmp_path, dpipe, inputs, suffix):
    sd = compvis_state_dict(dpipe)
    path = tmp_path / f"sd-v1-4{suffix}"
    if suffix == ".ckpt":
        torch.save({"state_dict": sd, "global_step": 470000, "epoch": 6}, path)
    else:
        save_file(sd, str(path))
    pipe = minidiff.load(path)
    assert pipe.unet.config.block_out_channels == (32, 64, 64)
    assert pipe.unet.config.cross_attention == (True, True, False)
    assert_same_model(pipe, dpipe, inputs)


def test_compvis_ema(tmp_path, dpipe, inputs):
    ema = {k: v * 0.5 for k, v in dpipe.unet.state_dict().items()}
    path = tmp_path / "full-ema.ckpt"
    torch.save({"state_dict": compvis_state_dict(dpipe, ema_unet=ema)}, path)
    raw = minidiff.load(path)
    with torch.no_grad():
        torch.testing.assert_close(raw.unet(inputs["latents"], 10, inputs["ctx"]),
                                   dpipe.unet(inputs["latents"], 10, inputs["ctx"]).sample, **TOL)
    smoothed = minidiff.load(path, ema=True)
    for k, v in smoothed.unet.state_dict().items():
        torch.testing.assert_close(v, ema[k])
    plain = tmp_path / "no-ema.ckpt"
    torch.save({"state_dict": compvis_state_dict(dpipe)}, plain)
    with pytest.raises(CheckpointError, match="no EMA weights"):
        minidiff.load(plain, ema=True)


def test_lightning_ckpt_loads_without_unsafe_pickle(tmp_path, dpipe):
    """The 2022 .ckpt files name pytorch_lightning's ModelCheckpoint and numpy scalars: they must still load safely."""
    import numpy as np
    mod = types.ModuleType("pytorch_lightning.callbacks.model_checkpoint")

    class ModelCheckpoint:
        pass
    ModelCheckpoint.__module__, ModelCheckpoint.__qualname__ = mod.__name__, "ModelCheckpoint"
    mod.ModelCheckpoint = ModelCheckpoint
    names = ["pytorch_lightning", "pytorch_lightning.callbacks", "pytorch_lightning.callbacks.model_checkpoint"]
    for n in names:
        sys.modules[n] = mod
    try:
        path = tmp_path / "lightning.ckpt"
        torch.save({"state_dict": compvis_state_dict(dpipe), "pytorch-lightning_version": "1.4.2",
                    "callbacks": {ModelCheckpoint: {"monitor": None, "best_model_score": np.float64(0.5)}}}, path)
    finally:
        for n in names:
            del sys.modules[n]
    pipe = minidiff.load(path)
    assert pipe.unet.config.layers_per_block == 2


CALLS = []


def _record(x):
    CALLS.append(x)
    return x


class Payload:
    """Unpickling this calls a function: what a malicious checkpoint would do."""

    def __reduce__(self):
        return (_record, ("ran",))


def test_pickle_with_code_is_refused(tmp_path, dpipe):
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": compvis_state_dict(dpipe), "extra": Payload()}, path)
    with pytest.raises(CheckpointError, match="unsafe_pickle=True") as e:
        minidiff.load(path)
    assert str(path) in str(e.value)
    assert CALLS == []
    with pytest.warns(UserWarning, match="weights_only=False"):
        minidiff.load(path, unsafe_pickle=True)
    assert CALLS == ["ran"]


# ---------------------------------------------------------------------------------------------- bad input
def test_not_a_model(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        minidiff.load(tmp_path / "nope.ckpt")
    (tmp_path / "folder").mkdir()
    with pytest.raises(CheckpointError, match="no model_index.json"):
        minidiff.load(tmp_path / "folder")
    (tmp_path / "empty.ckpt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        minidiff.load(tmp_path / "empty.ckpt")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(CheckpointError, match="unknown weights file type"):
        minidiff.load(tmp_path / "notes.txt")


@pytest.mark.parametrize("suffix", [".ckpt", ".safetensors"])
def test_truncated_file(tmp_path, dpipe, suffix):
    path = tmp_path / f"model{suffix}"
    sd = compvis_state_dict(dpipe)
    torch.save({"state_dict": sd}, path) if suffix == ".ckpt" else save_file(sd, str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt") as e:
        minidiff.load(path)
    assert str(path) in str(e.value)


def test_other_architectures_refused(tmp_path, dpipe):
    sd2 = {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1),
           "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight": torch.zeros(1)}
    save_file(sd2, str(tmp_path / "sd2.safetensors"))
    with pytest.raises(CheckpointError, match="SD 2.x.*cond_stage_model.model."):
        minidiff.load(tmp_path / "sd2.safetensors")
    sdxl = {"conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": torch.zeros(1),
            "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1)}
    save_file(sdxl, str(tmp_path / "sdxl.safetensors"))
    with pytest.raises(CheckpointError, match="SDXL"):
        minidiff.load(tmp_path / "sdxl.safetensors")
    save_file({"encoder.weight": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(CheckpointError, match="not a CompVis SD checkpoint.*encoder.weight"):
        minidiff.load(tmp_path / "other.safetensors")


def test_sd2_diffusers_folder_refused(tmp_path, dpipe):
    import json
    folder = write_diffusers(dpipe, tmp_path / "sd2")
    cfg = json.loads((folder / "unet" / "config.json").read_text())
    cfg["use_linear_projection"] = True
    write_json(folder / "unet" / "config.json", cfg)
    with pytest.raises(CheckpointError, match="use_linear_projection") as e:
        minidiff.load(folder)
    assert "unet" in str(e.value)


@pytest.mark.parametrize("damage", ["missing", "unexpected", "shape"])
def test_bad_keys_named(tmp_path, dpipe, damage):
    folder = write_diffusers(dpipe, tmp_path / "sd")
    file = folder / "unet" / "diffusion_pytorch_model.safetensors"
    sd = load_file(str(file))
    key = "down_blocks.1.attentions.0.proj_in.weight"
    if damage == "missing":
        del sd[key]
    elif damage == "unexpected":
        sd["down_blocks.1.attentions.0.extra.weight"] = torch.zeros(3)
        key = "down_blocks.1.attentions.0.extra.weight"
    else:
        sd[key] = torch.zeros(5, 5, 1, 1)
    save_file(sd, str(file))
    with pytest.raises(CheckpointError, match={"missing": "missing key", "unexpected": "unexpected key",
                                               "shape": "shape mismatch"}[damage]) as e:
        minidiff.load(folder)
    assert key in str(e.value) and str(file) in str(e.value)


# ---------------------------------------------------------------------------------------------- saving
@pytest.mark.parametrize("fmt", ["diffusers", "compvis"])
def test_save_load_round_trip(tmp_path, dpipe, inputs, fmt):
    pipe = minidiff.load(write_diffusers(dpipe, tmp_path / "src"))
    out = tmp_path / ("out" if fmt == "diffusers" else "out.safetensors")
    minidiff.save(pipe, out, format=fmt)
    again = minidiff.load(out)
    for a, b in [(pipe.unet, again.unet), (pipe.vae, again.vae), (pipe.text_encoder, again.text_encoder)]:
        sa, sb = a.state_dict(), b.state_dict()
        assert set(sa) == set(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert again.scheduler_config == pipe.scheduler_config
    assert_same_model(again, dpipe, inputs)


def test_diffusers_loads_what_save_writes(tmp_path, dpipe, inputs):
    from diffusers import StableDiffusionPipeline
    pipe = minidiff.load(write_diffusers(dpipe, tmp_path / "src"))
    minidiff.save(pipe, tmp_path / "out")
    reloaded = StableDiffusionPipeline.from_pretrained(str(tmp_path / "out"), safety_checker=None)
    assert_same_model(pipe, reloaded, inputs)


def test_save_overwrites_atomically(tmp_path, dpipe):
    pipe = minidiff.load(write_diffusers(dpipe, tmp_path / "src"))
    out = tmp_path / "out"
    minidiff.save(pipe, out)
    minidiff.save(pipe, out)  # replacing an existing save leaves one complete folder and no temporaries
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]
    with pytest.raises(ValueError, match="format"):
        minidiff.save(pipe, tmp_path / "x", format="onnx")


def test_dtype(tmp_path, dpipe):
    folder = write_diffusers(dpipe, tmp_path / "sd")
    half = minidiff.load(folder, dtype=torch.float16)
    assert half.unet.conv_in.weight.dtype == torch.float16
    assert half.vae.decoder.conv_in.weight.dtype == torch.float32  # fp16 VAE decodes overflow
    bf = minidiff.load(folder, dtype=torch.bfloat16)
    assert bf.vae.decoder.conv_in.weight.dtype == torch.bfloat16
