"""LoRA files across the ecosystem, with diffusers (+ PEFT) as the oracle, on the tiny random-weight SD model:

  * a LoRA minidiff trains (U-Net attention, feed-forward, proj_in/proj_out, ResNet convs, text encoder) and saves in
    either layout loads with diffusers' load_lora_weights and gives minidiff's image (fast path on and off);
  * LoRAs made by diffusers/PEFT (both text-encoder spellings, with and without the PEFT header) and written in
    kohya/A1111 layout by hand (also in CompVis names, LoCon convolutions) load in minidiff and give diffusers' image,
    at scale 1 and at another scale (diffusers' fuse_lora(lora_scale=S));
  * keys that name no layer, wrong shapes, unknown layouts: clear errors."""
import json
import re

import diffusers
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import minidiff
from interop_helpers import TOL, load_diffusers, ours, shared_folder, theirs
from minidiff.formats.lora import LoRAFileError
from minidiff.lora import (TEXT_ENCODER_TARGETS, UNET_CONV_TARGETS, UNET_TARGETS, LoRAConv2d, apply_lora,
                           inject_lora, load_lora, lora_layers, merge_lora, save_lora, set_lora_scale, unmerge_lora)

pytest.importorskip("peft")  # diffusers' load_lora_weights needs PEFT (a test extra)


@pytest.fixture(scope="module")
def folder():
    return shared_folder()


def _randomise(model, seed, std=0.2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_layers(model).values():
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * std)


def _trained_pipe(folder):
    """minidiff with LoRA on every kind of layer, B random (as after training), one layer with its own α."""
    pipe = minidiff.load(folder)
    layers = inject_lora(pipe.unet, rank=4, alpha=8, targets=UNET_TARGETS + UNET_CONV_TARGETS)
    inject_lora(pipe.text_encoder, rank=2, alpha=1, targets=TEXT_ENCODER_TARGETS)
    _randomise(pipe.unet, 1)
    _randomise(pipe.text_encoder, 2)
    # layers with their own α (kohya writes one per module; diffusers' header an alpha_pattern). Not an attention
    # projection: diffusers' kohya converter loses a per-module α there (its alpha key keeps "processor.to_q_lora")
    layers["down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2"].alpha = 2.0
    layers["down_blocks.0.resnets.0.conv1"].alpha = 16.0
    assert isinstance(layers["down_blocks.0.attentions.0.proj_in"], LoRAConv2d)
    assert isinstance(layers["down_blocks.0.resnets.0.conv1"], LoRAConv2d)
    return pipe


@pytest.mark.parametrize("fmt", ["diffusers", "kohya"])
def test_minidiff_lora_loads_in_diffusers(folder, tmp_path, fmt):
    pipe = _trained_pipe(folder)
    fast = ours(pipe)                      # generate() with the LoRA layers in place, default (fast) path ...
    slow = ours(pipe, fast=False)          # ... and the reference modules
    torch.testing.assert_close(fast, slow, **TOL)
    base = ours(minidiff.load(folder))
    assert (fast - base).abs().max() > 0.05  # the LoRA changes the image

    path = save_lora(pipe, tmp_path / "lora.safetensors", format=fmt)
    keys = load_file(str(path))
    if fmt == "diffusers":
        assert "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight" in keys
        with safe_open(str(path), "pt") as f:
            meta = json.loads(f.metadata()["lora_adapter_metadata"])
        assert meta["unet.r"] == 4 and meta["unet.lora_alpha"] == 8 and meta["text_encoder.lora_alpha"] == 1
        assert meta["unet.alpha_pattern"] == {"down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2": 2.0,
                                              "down_blocks.0.resnets.0.conv1": 16.0}
    else:
        assert keys["lora_unet_down_blocks_0_resnets_0_conv1.alpha"].item() == 16.0
        assert "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight" in keys
    dpipe = load_diffusers(folder)
    dpipe.load_lora_weights(str(path))
    torch.testing.assert_close(fast, theirs(dpipe), **TOL)
    # and back into a fresh minidiff model, merged into its weights
    torch.testing.assert_close(ours(apply_lora(minidiff.load(folder), path)), fast, **TOL)


def test_old_call_save_lora_unet_with_metadata(folder, tmp_path):
    """minidiff finetune's call: save_lora(pipe.unet, path, extra_metadata) -> a U-Net-only diffusers file."""
    pipe = minidiff.load(folder)
    inject_lora(pipe.unet, rank=2, alpha=4)
    _randomise(pipe.unet, 3)
    path = save_lora(pipe.unet, tmp_path / "lora.safetensors", {"base_model": "x"})
    tensors, meta = minidiff.lora.read_lora(path)
    assert meta["base_model"] == "x" and meta["rank"] == 2 and meta["alpha"] == 4.0
    assert all(k.startswith("unet.") for k in tensors)
    dpipe = load_diffusers(folder)
    dpipe.load_lora_weights(str(path))
    torch.testing.assert_close(ours(pipe), theirs(dpipe), **TOL)


# ---------------------------------------------------------------------------------------------- made elsewhere
def _peft_lora(folder, tmp_path, header: bool):
    """A LoRA trained (here: randomly initialised) with PEFT on diffusers' U-Net and transformers' text encoder, saved
    by diffusers' own save_lora_weights (transformers 5 spells the text encoder `text_encoder.encoder.layers…`)."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict
    dpipe = load_diffusers(folder)
    torch.manual_seed(0)
    unet_cfg = LoraConfig(r=4, lora_alpha=6, init_lora_weights=False, alpha_pattern={"proj_out": 3},
                          target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.2"])
    text_cfg = LoraConfig(r=2, lora_alpha=5, init_lora_weights=False, target_modules=["q_proj", "v_proj", "fc1"])
    dpipe.unet.add_adapter(unet_cfg)
    inject_adapter_in_model(text_cfg, dpipe.text_encoder)  # (transformers' add_adapter wants a newer PEFT)
    meta = dict(unet_lora_adapter_metadata=unet_cfg.to_dict(), text_encoder_lora_adapter_metadata=text_cfg.to_dict())
    StableDiffusionPipeline.save_lora_weights(
        str(tmp_path), unet_lora_layers=get_peft_model_state_dict(dpipe.unet),
        text_encoder_lora_layers=get_peft_model_state_dict(dpipe.text_encoder), **(meta if header else {}))
    return tmp_path / "pytorch_lora_weights.safetensors"


@pytest.mark.parametrize("spelling", ["transformers5", "text_model"])
@pytest.mark.parametrize("header", [True, False], ids=["peft-header", "no-header"])
def test_diffusers_lora_loads_in_minidiff(folder, tmp_path, header, spelling):
    path = _peft_lora(folder, tmp_path, header)
    keys = load_file(str(path))
    assert any(k.startswith("text_encoder.encoder.layers.") for k in keys)
    if spelling == "text_model":   # how the published files (transformers 4) spell it
        with safe_open(str(path), "pt") as f:
            meta = f.metadata()
        save_file({k.replace("text_encoder.", "text_encoder.text_model.", 1): v for k, v in keys.items()},
                  str(path), metadata=meta)
    dpipe = load_diffusers(folder)
    dpipe.load_lora_weights(str(path))
    torch.testing.assert_close(ours(apply_lora(minidiff.load(folder), path)), theirs(dpipe), **TOL)
    dpipe.fuse_lora(lora_scale=0.5)    # lora_scale applies to the U-Net and the text encoder
    dpipe.unload_lora_weights()        # the fused weights stay
    torch.testing.assert_close(ours(apply_lora(minidiff.load(folder), path, scale=0.5)), theirs(dpipe), **TOL)


def _kohya_tensors(compvis: bool, alphas: bool = True) -> dict:
    """A kohya/A1111 file written by hand from known tensors: attention, feed-forward, proj_in as a 1×1 LoCon, a
    3×3 ResNet conv (LoCon), an up-block attention, the text encoder's attention and MLP. alphas: one α per module
    as kohya writes them (the attention projections share the most common α: diffusers' kohya converter loses a
    different one there), or none at all (α = r)."""
    g = torch.Generator().manual_seed(7)
    r = lambda *s: torch.randn(*s, generator=g) * 0.3  # noqa: E731
    # (diffusers spelling, CompVis spelling, down shape, up shape, alpha or None)
    mods = [("down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
             "input_blocks_1_1_transformer_blocks_0_attn1_to_q", (4, 32), (32, 4), 3.0),
            ("down_blocks_1_attentions_1_transformer_blocks_0_attn2_to_k",
             "input_blocks_5_1_transformer_blocks_0_attn2_to_k", (4, 64), (64, 4), 3.0),
            ("down_blocks_0_attentions_1_transformer_blocks_0_ff_net_2",
             "input_blocks_2_1_transformer_blocks_0_ff_net_2", (8, 128), (32, 8), 16.0),
            ("down_blocks_0_attentions_0_proj_in", "input_blocks_1_1_proj_in", (4, 32, 1, 1), (32, 4, 1, 1), 1.0),
            ("down_blocks_0_resnets_1_conv1", "input_blocks_2_0_in_layers_2", (2, 32, 3, 3), (32, 2, 1, 1), 4.0),
            ("up_blocks_2_attentions_2_transformer_blocks_0_attn2_to_out_0",
             "output_blocks_8_1_transformer_blocks_0_attn2_to_out_0", (4, 32), (32, 4), 3.0),
            ("mid_block_attentions_0_proj_out", "middle_block_1_proj_out", (4, 64, 1, 1), (64, 4, 1, 1), 0.5)]
    sd = {}
    for diffusers_name, compvis_name, down, up, alpha in mods:
        name = "lora_unet_" + (compvis_name if compvis else diffusers_name)
        sd[name + ".lora_down.weight"], sd[name + ".lora_up.weight"] = r(*down), r(*up)
        if alphas:
            sd[name + ".alpha"] = torch.tensor(alpha)
    # (with out_proj: diffusers tells its old text-encoder spellings apart by "to_out_lora", and drops q_proj
    # otherwise; kohya trains all six anyway)
    for name, down, up in [("self_attn_q_proj", (2, 64), (64, 2)), ("self_attn_out_proj", (2, 64), (64, 2)),
                           ("mlp_fc1", (2, 64), (37, 2))]:
        key = "lora_te_text_model_encoder_layers_1_" + name
        sd[key + ".lora_down.weight"], sd[key + ".lora_up.weight"] = r(*down), r(*up)
        if alphas:
            sd[key + ".alpha"] = torch.tensor(1.0)
    return sd


@pytest.mark.parametrize("alphas", [True, False], ids=["alpha", "no-alpha"])
@pytest.mark.parametrize("scale", [1.0, 0.7])
def test_kohya_lora_loads_in_minidiff(folder, tmp_path, scale, alphas):
    path = tmp_path / "kohya.safetensors"
    save_file(_kohya_tensors(compvis=False, alphas=alphas), str(path))
    dpipe = load_diffusers(folder)
    dpipe.load_lora_weights(str(path))
    dpipe.fuse_lora(lora_scale=scale)
    pipe = minidiff.load(folder)
    ours(pipe)          # generate once first: the fast path's cached fused/packed weights must see the change
    apply_lora(pipe, path, scale=scale)
    torch.testing.assert_close(ours(pipe), theirs(dpipe), **TOL)

    # the LoCon conv, by its rule: ΔW = scale · α/r · (up.flatten(1) @ down.flatten(1)).reshape(W.shape)
    sd = _kohya_tensors(compvis=False, alphas=alphas)
    name = "lora_unet_down_blocks_0_resnets_1_conv1"
    down, up = sd[name + ".lora_down.weight"], sd[name + ".lora_up.weight"]
    base = minidiff.load(folder).unet.down_blocks[0].resnets[1].conv1.weight
    alpha_over_r = 4.0 / 2 if alphas else 1.0   # no .alpha: α = r
    expected = base + scale * alpha_over_r * (up.flatten(1) @ down.flatten(1)).reshape(base.shape)
    torch.testing.assert_close(pipe.unet.down_blocks[0].resnets[1].conv1.weight, expected, rtol=0, atol=1e-6)


def test_kohya_compvis_spelling(folder, tmp_path):
    """The U-Net in CompVis names (input_blocks_1_1_…): the same change as the diffusers spelling, and diffusers'
    image when diffusers is told the U-Net's config (it maps SGM names only then)."""
    path = tmp_path / "compvis.safetensors"
    save_file(_kohya_tensors(compvis=True), str(path))
    dpipe = load_diffusers(folder)
    dpipe.load_lora_weights(str(path), unet_config=dpipe.unet.config)
    pipe = apply_lora(minidiff.load(folder), path)
    torch.testing.assert_close(ours(pipe), theirs(dpipe), **TOL)
    save_file(_kohya_tensors(compvis=False), str(tmp_path / "plain.safetensors"))
    other = apply_lora(minidiff.load(folder), tmp_path / "plain.safetensors")
    a, b = pipe.unet.state_dict(), other.unet.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def _old_diffusers_name(key: str) -> str:
    """A PEFT key as diffusers' attention-processor era spelled it (2023 files: pytorch_lora_weights.bin)."""
    ab = {"lora_A": "down", "lora_B": "up"}
    if key.startswith("unet.") and any(f".{p}.lora_" in key for p in ("to_q", "to_k", "to_v", "to_out.0")):
        head, proj, tail = re.match(r"(.*)\.(to_q|to_k|to_v|to_out\.0)\.(lora_[AB])\.weight", key).groups()
        return f"{head}.processor.{proj.replace('.0', '')}_lora.{ab[tail]}.weight"
    if key.startswith("text_encoder.") and ".self_attn." in key:
        head, proj, tail = re.match(r"(.*)\.(q|k|v|out)_proj\.(lora_[AB])\.weight", key).groups()
        return f"{head}.to_{proj}_lora.{ab[tail]}.weight"
    head, tail = re.match(r"(.*)\.(lora_[AB])\.weight", key).groups()
    return f"{head}.lora_linear_layer.{ab[tail]}.weight" if key.startswith("text_encoder.") else \
        f"{head}.lora.{ab[tail]}.weight"


def test_pickled_and_older_diffusers_spellings(folder, tmp_path):
    """The same LoRA as a .bin pickle in diffusers' older key names changes the weights exactly as the PEFT file."""
    pipe = _trained_pipe(folder)
    path = save_lora(pipe, tmp_path / "lora.safetensors")
    tensors = load_file(str(path))
    old = {_old_diffusers_name(k): v for k, v in tensors.items()}
    assert "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora.down.weight" in old
    assert "text_encoder.text_model.encoder.layers.0.self_attn.to_q_lora.up.weight" in old
    torch.save(old, tmp_path / "pytorch_lora_weights.bin")
    # no PEFT header in the old files: give every layer α = r, then both files mean the same
    for net in (pipe.unet, pipe.text_encoder):
        for m in lora_layers(net).values():
            m.alpha = float(m.rank)
    save_lora(pipe, path)
    a = apply_lora(minidiff.load(folder), path)
    b = apply_lora(minidiff.load(folder), tmp_path / "pytorch_lora_weights.bin")
    for x, y in [(a.unet, b.unet), (a.text_encoder, b.text_encoder)]:
        sx, sy = x.state_dict(), y.state_dict()
        assert all(torch.equal(sx[k], sy[k]) for k in sx)
    assert not torch.equal(a.unet.down_blocks[0].resnets[0].conv1.weight,
                           minidiff.load(folder).unet.down_blocks[0].resnets[0].conv1.weight)


# ---------------------------------------------------------------------------------------------- LCM-LoRA
# What latent-consistency/lcm-lora-sdv1-5 changes: the PEFT targets of its distillation (diffusers'
# train_lcm_distill_lora_sd_wds.py), written in kohya's layout (the LCM repository's get_module_kohya_state_dict:
# lora_unet_<diffusers module path with "_">.lora_down / .lora_up / .alpha = lora_alpha, in fp16); no text encoder.
LCM_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
                    "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj")


def _lcm_lora_tensors(unet, rank=8, seed=0) -> dict:
    """A random-weight file in the LCM-LoRA layout for a diffusers U-Net: every Linear / Conv2d whose name ends in
    one of the targets (PEFT's rule), α = r as the published file's lora_alpha = lora_rank."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, m in unet.named_modules():
        if not isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) or \
                not any(name == t or name.endswith("." + t) for t in LCM_LORA_TARGETS):
            continue
        key = "lora_unet_" + name.replace(".", "_")
        if isinstance(m, torch.nn.Linear):
            down, up = (rank, m.in_features), (m.out_features, rank)
        else:  # LoCon: A has W's kernel, B is 1×1
            down, up = (rank, m.in_channels, *m.kernel_size), (m.out_channels, rank, 1, 1)
        sd[key + ".lora_down.weight"] = (torch.randn(down, generator=g) * 0.1).half()
        sd[key + ".lora_up.weight"] = (torch.randn(up, generator=g) * 0.1).half()
        sd[key + ".alpha"] = torch.tensor(float(rank)).half()
    return sd


@pytest.mark.parametrize("how", ["apply_lora", "load_lora"])
def test_lcm_lora_samples_as_diffusers(folder, tmp_path, how):
    """An LCM-LoRA-layout file (every module kind the public one touches: attention, feed-forward, proj_in/out,
    ResNet convs and shortcuts, time_emb_proj, down/upsamplers) applied to SD samples with scheduler="lcm", 4 steps,
    guidance 1 exactly as diffusers' load_lora_weights + LCMScheduler (seeded: LCM draws noise between steps)."""
    dpipe = load_diffusers(folder)
    sd = _lcm_lora_tensors(dpipe.unet)
    kinds = {t for t in LCM_LORA_TARGETS if any(k.endswith(t.replace(".", "_") + ".alpha") for k in sd)}
    assert kinds == set(LCM_LORA_TARGETS)   # the tiny U-Net has every kind of layer the file names
    path = tmp_path / "pytorch_lora_weights.safetensors"
    save_file(sd, str(path))
    dpipe.load_lora_weights(str(path))
    dpipe.scheduler = diffusers.LCMScheduler.from_config(dpipe.scheduler.config)
    ref = dpipe("a toucan", num_inference_steps=4, guidance_scale=1.0, generator=torch.Generator().manual_seed(3),
                output_type="pt").images
    pipe = minidiff.load(folder)
    if how == "apply_lora":
        apply_lora(pipe, path)
    else:
        assert len(load_lora(pipe, path)) == len(sd) // 3   # every module of the file, wrapped
    ours = pipe.generate("a toucan", steps=4, guidance_scale=1.0, scheduler="lcm", seed=3, output="tensor",
                         progress=False)
    torch.testing.assert_close(ours, ref, **TOL)
    base = minidiff.load(folder).generate("a toucan", steps=4, guidance_scale=1.0, scheduler="LCM", seed=3,
                                          output="tensor", progress=False)
    assert (base - ref).abs().max() > 100 * TOL["atol"]   # the LoRA changed the picture


# ---------------------------------------------------------------------------------------------- scale, merge
def test_load_scale_merge_unmerge(folder, tmp_path):
    path = tmp_path / "kohya.safetensors"
    save_file(_kohya_tensors(compvis=False), str(path))
    base = minidiff.load(folder)
    w0 = {k: v.clone() for k, v in base.unet.state_dict().items()}
    layers = load_lora(base, path, scale=0.5)
    assert set(layers) >= {"unet.down_blocks.0.resnets.1.conv1", "text_encoder.encoder.layers.1.mlp.fc1"}
    half = ours(apply_lora(minidiff.load(folder), path, scale=0.5))
    torch.testing.assert_close(ours(base), half, **TOL)          # wrapped, not merged, fast path
    set_lora_scale(base, 1.0)                                    # later: full strength
    torch.testing.assert_close(ours(base), ours(apply_lora(minidiff.load(folder), path)), **TOL)
    merge_lora(base, unload=False)
    torch.testing.assert_close(ours(base, fast=False), ours(apply_lora(minidiff.load(folder), path)), **TOL)
    unmerge_lora(base.unet)
    for k, v in base.unet.state_dict().items():
        if ".lora_" not in k:
            torch.testing.assert_close(v, w0[k.replace(".base.", ".")], rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------- bad files
def test_errors_name_the_key(folder, tmp_path):
    pipe = minidiff.load(folder)
    sd = _kohya_tensors(compvis=False)
    sd["lora_unet_down_blocks_9_attentions_0_proj_in.lora_down.weight"] = torch.zeros(2, 32, 1, 1)
    save_file(sd, str(tmp_path / "extra.safetensors"))
    with pytest.raises(LoRAFileError, match="'lora_unet_down_blocks_9_attentions_0_proj_in.lora_down.weight' maps "
                                            "to no layer"):
        apply_lora(pipe, tmp_path / "extra.safetensors")
    with pytest.raises(KeyError, match="no module"):             # minidiff's first apply_lora raised KeyError
        apply_lora(torch.nn.Sequential(torch.nn.Linear(2, 2)), tmp_path / "extra.safetensors")

    save_file({"unet.down_blocks.0.attentions.0.proj_in.lora_A.weight": torch.zeros(2, 31, 1, 1),
               "unet.down_blocks.0.attentions.0.proj_in.lora_B.weight": torch.zeros(32, 2, 1, 1)},
              str(tmp_path / "shape.safetensors"))
    with pytest.raises(ValueError, match=r"proj_in.lora_A.weight'.*\(2, 31, 1, 1\).*\(32, 32, 1, 1\)"):
        apply_lora(pipe, tmp_path / "shape.safetensors")

    save_file({"lora_unet_x.hada_w1_a": torch.zeros(1)}, str(tmp_path / "loha.safetensors"))
    with pytest.raises(ValueError, match="'lora_unet_x.hada_w1_a' is not a LoRA A/B/alpha tensor"):
        apply_lora(pipe, tmp_path / "loha.safetensors")
    save_file({"model.weight": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a LoRA file.*'model.weight'"):
        apply_lora(pipe, tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="format must be one of"):
        inject_lora(pipe.unet, 2)
        save_lora(pipe, tmp_path / "x.safetensors", format="civitai")
