"""Every module a downloaded LoRA may touch is read (issue #27), the kohya LoCon / LyCORIS side.

The LoRA files users download put LoRA on far more than the attention projections: the public LCM-LoRA for SD v1.5
and kohya's LoCon files (sd-scripts networks/lora.py with conv_dim: every Linear and Conv2d inside
Transformer2DModel, ResnetBlock2D, Downsample2D, Upsample2D) touch the feed-forward, proj_in/proj_out, the ResNets'
conv1/conv2/conv_shortcut/time_emb_proj and the samplers' convs; LyCORIS' "full" preset adds conv_in, conv_out and
the time-embedding MLP. A synthetic file with LoRA on every one of them (the module list taken from diffusers' own
model by those classes, not from minidiff's tables), in the spellings files come in:

  * kohya, diffusers module names      lora_unet_down_blocks_0_resnets_0_time_emb_proj.lora_down.weight
  * kohya, CompVis (LDM) module names  lora_unet_input_blocks_1_0_emb_layers_1.lora_down.weight
  * diffusers / PEFT                   unet.down_blocks.0.resnets.0.time_emb_proj.lora_A.weight (made by PEFT)

loads in minidiff (merged, and as layers) and in diffusers (load_lora_weights + fuse_lora) with the same image.
A key minidiff would not apply is an error that names it: nothing is dropped silently.
(The LCM-LoRA layout itself has its own test beside the LCM sampler.)"""
import re

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import minidiff
from interop_helpers import TOL, load_diffusers, ours, shared_folder, theirs
from minidiff.formats.lora import LoRAFileError
from minidiff.lora import apply_lora, load_lora

pytest.importorskip("peft")

UNET_CLASSES = ("Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D")   # kohya with conv_dim, LoCon
UNET_NAMED = ("conv_in", "conv_out", "time_embedding.linear_1", "time_embedding.linear_2")   # LyCORIS "full"
TEXT_CLASSES = ("CLIPAttention", "CLIPMLP")                                                # kohya's text encoder set


@pytest.fixture(scope="module")
def folder():
    return shared_folder()


@pytest.fixture(scope="module")
def locon(folder):
    """The kohya file (diffusers module names) of the test below, built once."""
    return _kohya_file(load_diffusers(folder), compvis=False)


def _modules(model, classes, named=()) -> dict[str, nn.Module]:
    """{path: Linear | Conv2d} of every such layer inside a module of one of `classes`, plus the `named` layers."""
    found = {}
    for name, module in model.named_modules():
        if type(module).__name__ in classes:
            for child, m in module.named_modules():
                if isinstance(m, (nn.Linear, nn.Conv2d)):
                    found[f"{name}.{child}"] = m
        elif name in named:
            found[name] = m if isinstance(m := module, (nn.Linear, nn.Conv2d)) else None
    return found


def _rank_alpha(layer) -> tuple[int, float]:
    """kohya's convention: Linear and 1×1 conv (rank 4, α 2), k×k conv (conv_dim 2, conv_alpha 4)."""
    return (2, 4.0) if isinstance(layer, nn.Conv2d) and layer.kernel_size != (1, 1) else (4, 2.0)


def _down_up(layer, rank, g):
    if isinstance(layer, nn.Conv2d):   # LoCon: down = conv with the layer's kernel, up = 1×1 conv
        o, i, kh, kw = layer.weight.shape
        return torch.randn(rank, i, kh, kw, generator=g) * 0.2, torch.randn(o, rank, 1, 1, generator=g) * 0.2
    o, i = layer.weight.shape
    return torch.randn(rank, i, generator=g) * 0.2, torch.randn(o, rank, generator=g) * 0.2


def _ldm_name(path: str, layers_per_block: int, up_attention: list[bool]) -> str:
    """A diffusers U-Net module path in LDM's names (ldm/modules/diffusionmodules/openaimodel.py), written out here
    from LDM's layout: input_blocks[0] = conv_in, then per level L × [ResBlock, SpatialTransformer?] and a
    [Downsample]; middle_block = [ResBlock, SpatialTransformer, ResBlock]; output_blocks per level (deepest first)
    (L + 1) × [ResBlock, SpatialTransformer?, Upsample?]; out = [norm, SiLU, conv_out]."""
    L = layers_per_block
    resnet = {"conv1": "in_layers.2", "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1",
              "conv_shortcut": "skip_connection"}
    fixed = {"conv_in": "input_blocks.0.0", "conv_out": "out.2", "time_embedding.linear_1": "time_embed.0",
             "time_embedding.linear_2": "time_embed.2"}
    if path in fixed:
        return fixed[path]
    m = re.fullmatch(r"(down|up)_blocks\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.+)", path) \
        or re.fullmatch(r"(mid)_block\.(resnets|attentions)\.(\d+)\.(.+)", path)
    if m[1] == "mid":
        kind, j, rest = m[2], int(m[3]), m[4]
        return f"middle_block.{2 * j if kind == 'resnets' else 1}." + (resnet[rest] if kind == "resnets" else rest)
    side, level, kind, j, rest = m[1], int(m[2]), m[3], int(m[4]), m[5]
    if side == "down":
        if kind == "downsamplers":
            return f"input_blocks.{(level + 1) * (L + 1)}.0.op"
        return f"input_blocks.{1 + level * (L + 1) + j}.{0 if kind == 'resnets' else 1}." + \
            (resnet[rest] if kind == "resnets" else rest)
    if kind == "upsamplers":
        return f"output_blocks.{level * (L + 1) + L}.{2 if up_attention[level] else 1}.conv"
    return f"output_blocks.{level * (L + 1) + j}.{0 if kind == 'resnets' else 1}." + \
        (resnet[rest] if kind == "resnets" else rest)


def _kohya_file(dpipe, compvis: bool) -> dict[str, torch.Tensor]:
    """LoRA on every module of the LoCon/LyCORIS-full set and the text encoder, written the way kohya writes it."""
    g = torch.Generator().manual_seed(11)
    cfg = dpipe.unet.config
    up_attention = [t.startswith("CrossAttn") for t in cfg.up_block_types]
    sd = {}
    for path, layer in _modules(dpipe.unet, UNET_CLASSES, UNET_NAMED).items():
        name = _ldm_name(path, cfg.layers_per_block, up_attention) if compvis else path
        key = "lora_unet_" + name.replace(".", "_")
        rank, alpha = _rank_alpha(layer)
        sd[key + ".lora_down.weight"], sd[key + ".lora_up.weight"] = _down_up(layer, rank, g)
        sd[key + ".alpha"] = torch.tensor(alpha)
    for path, layer in _modules(dpipe.text_encoder, TEXT_CLASSES).items():
        key = "lora_te_text_model_" + path.removeprefix("text_model.").replace(".", "_")   # as transformers 4 named it
        sd[key + ".lora_down.weight"], sd[key + ".lora_up.weight"] = _down_up(layer, 4, g)
        sd[key + ".alpha"] = torch.tensor(2.0)
    return sd


def _peft_file(folder, tmp_path):
    """The same set made by PEFT on diffusers' U-Net and saved by diffusers' save_lora_weights (the PEFT header holds
    the per-layer ranks and alphas in rank_pattern / alpha_pattern)."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    dpipe = load_diffusers(folder)
    layers = _modules(dpipe.unet, UNET_CLASSES, UNET_NAMED)
    kxk = [p for p, m in layers.items() if _rank_alpha(m)[0] == 2]
    torch.manual_seed(0)
    cfg = LoraConfig(r=4, lora_alpha=2, init_lora_weights=False, target_modules=sorted(layers),
                     rank_pattern={re.escape(p): 2 for p in kxk}, alpha_pattern={re.escape(p): 4 for p in kxk})
    dpipe.unet.add_adapter(cfg)
    StableDiffusionPipeline.save_lora_weights(str(tmp_path), unet_lora_layers=get_peft_model_state_dict(dpipe.unet),
                                              unet_lora_adapter_metadata=cfg.to_dict())
    return tmp_path / "pytorch_lora_weights.safetensors", len(layers)


@pytest.mark.parametrize("spelling", ["kohya", "kohya-compvis", "peft"])
def test_every_module_a_downloaded_lora_touches_loads_with_diffusers_image(folder, tmp_path, spelling):
    dpipe = load_diffusers(folder)
    if spelling == "peft":
        path, n_unet = _peft_file(folder, tmp_path)
        n_text = 0
    else:
        sd = _kohya_file(dpipe, compvis=spelling == "kohya-compvis")
        path = tmp_path / "locon.safetensors"
        save_file(sd, str(path))
        n_unet = sum(k.startswith("lora_unet_") and k.endswith(".alpha") for k in sd)
        n_text = sum(k.startswith("lora_te_") and k.endswith(".alpha") for k in sd)
    unet_names = _modules(dpipe.unet, UNET_CLASSES, UNET_NAMED)
    assert n_unet == len(unet_names) and any(p.endswith("time_emb_proj") for p in unet_names)
    assert {"conv_in", "conv_out", "down_blocks.0.downsamplers.0.conv", "up_blocks.0.upsamplers.0.conv",
            "down_blocks.1.resnets.0.conv_shortcut"} <= set(unet_names)

    # diffusers. The CompVis spelling names the same tensors as the diffusers one (_kohya_file draws them in the same
    # order): diffusers reads that one, because its LDM-name mapping (diffusers 0.42) puts output_blocks.2.1.conv —
    # the upsampler of a level without attention, as SD v1's deepest up-level — on up_blocks.0.attentions.2.conv
    if spelling == "kohya-compvis":
        save_file(_kohya_file(dpipe, compvis=False), str(tmp_path / "same-in-diffusers-names.safetensors"))
        dpipe.load_lora_weights(str(tmp_path / "same-in-diffusers-names.safetensors"))
    else:
        dpipe.load_lora_weights(str(path))
    dpipe.fuse_lora(lora_scale=0.8)
    want = theirs(dpipe)
    assert (want - theirs(load_diffusers(folder))).abs().max() > 0.05        # the LoRA changes the image

    # minidiff, merged into the weights ...
    pipe = apply_lora(minidiff.load(folder), path, scale=0.8)
    torch.testing.assert_close(ours(pipe), want, **TOL)
    # ... and as LoRA layers (unmerged: each wrapped layer runs its own forward, time_embedding.linear_1 included)
    layered = minidiff.load(folder)
    wrapped = load_lora(layered, path, scale=0.8)
    assert len(wrapped) == n_unet + n_text                                   # every layer of the file, none dropped
    torch.testing.assert_close(ours(layered), want, **TOL)
    torch.testing.assert_close(ours(layered, fast=False), want, **TOL)


@pytest.mark.parametrize("key", [
    "lora_unet_label_emb_0_0.lora_down.weight",                              # SDXL's added-conditioning MLP
    "lora_unet_down_blocks_0_resnets_0_norm1.lora_down.weight",              # a GroupNorm: no LoRA layer there
    "lora_unet_down_blocks_0_resnets_0_conv1.dora_scale",                    # DoRA's magnitude vector
    "lora_unet_down_blocks_0_resnets_0_conv1.hada_w1_a",                     # LyCORIS LoHa
    "lora_unet_input_blocks_12_0_emb_layers_1.lora_down.weight",             # a CompVis block the model lacks
])
def test_a_key_minidiff_does_not_apply_is_an_error_naming_it(folder, locon, tmp_path, key):
    """Added to a file that is otherwise fine (every module above), one key minidiff cannot apply: the file is refused
    with that key in the message, not loaded without it."""
    sd = {**locon, key: torch.zeros(2, 4)}
    save_file(sd, str(tmp_path / "extra.safetensors"))
    for load in (apply_lora, load_lora):
        with pytest.raises(LoRAFileError, match=re.escape(repr(key))):
            load(minidiff.load(folder), tmp_path / "extra.safetensors")
