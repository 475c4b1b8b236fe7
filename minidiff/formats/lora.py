"""LoRA files: the two layouts SD v1 users share, read into minidiff models and written from them.

Every LoRA file holds, per layer it changes, the pair (A, B) and a strength α, with ΔW = scale · (α/r) · B A
(minidiff/nn/lora.py). The layouts differ only in names and in where α lives:

  diffusers / PEFT   pytorch_lora_weights.safetensors (diffusers' training scripts, PEFT)
      unet.<module>.lora_A.weight  [r, in] (a conv: [r, in, k, k])    unet.<module>.lora_B.weight  [out, r] ([out, r, 1, 1])
      text_encoder.text_model.<module>.lora_A.weight   (published files; transformers 5 writes text_encoder.<module>…)
      α: the safetensors header "lora_adapter_metadata", one PEFT LoraConfig per part with its keys prefixed
         ({"unet.r": 4, "unet.lora_alpha": 8, "unet.alpha_pattern": {...}, "unet.target_modules": [...], ...});
         no header: α = r (diffusers' rule). Older diffusers spellings (…processor.to_q_lora.down.weight,
         …lora_linear_layer.up.weight) are read too.
  kohya / A1111      what kohya's sd-scripts writes and AUTOMATIC1111 / ComfyUI read
      lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight  (= A)
      ….lora_up.weight (= B), ….alpha (a scalar; none: α = r), one α per module
      lora_te_text_model_encoder_layers_0_self_attn_q_proj…   the text encoder
      lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q…   the U-Net in CompVis names (older tools)
      LoCon: the same keys on convolutions (lora_down [r, in, k, k], lora_up [out, r, 1, 1])

The format is told from the keys. Names are matched the way minidiff/formats/keymaps.py does it: from each layer of
*our* model to the name(s) it has in a layout, so every key of the file is accounted for; a key that names no layer of
the model is an error that names it.
"""
from __future__ import annotations

import json
import math
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from ..files import atomic_write
from ..networks import networks
from ..nn.lora import LORA_LAYERS, LoRALayer, lora_layers, wrap_layer
from . import keymaps
from .weights import read_state_dict

DIFFUSERS, KOHYA = "diffusers", "kohya"
FORMATS = (DIFFUSERS, KOHYA)
METADATA_KEY = "lora_adapter_metadata"   # diffusers' safetensors-header key (diffusers.loaders.lora_base)
MINIDIFF_KEY = "minidiff_lora"           # minidiff's own note: rank, alpha and what the caller adds (base_model ...)
KOHYA_PREFIX = {"unet": "lora_unet_", "text_encoder": "lora_te_"}
LORA_NETWORKS = ("unet", "text_encoder")  # the networks of a pipe a LoRA file changes (never the VAE)


class LoRAFileError(KeyError, ValueError):
    """A LoRA file that does not fit the model: an unknown key, a wrong shape, an unsupported variant.
    (A KeyError for the callers of minidiff's first apply_lora, a ValueError for everyone else.)"""

    def __str__(self):  # KeyError would print the message in quotes
        return str(self.args[0])


@dataclass
class LoRAEntry:
    """One layer's LoRA as read from a file: the part ("unet" | "text_encoder"), our module path, A, B, α."""
    part: str
    path: str
    A: torch.Tensor   # [r, in] or [r, in, k, k]
    B: torch.Tensor   # [out, r] or [out, r, 1, 1]
    alpha: float

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    def delta(self, scale: float = 1.0) -> torch.Tensor:
        """scale · (α/r) · B A, flattened to a matrix product and shaped back: [out, in] or [out, in, k, k]."""
        BA = self.B.flatten(1).float() @ self.A.flatten(1).float()       # [out, r] @ [r, in·k·k]
        return scale * self.alpha / self.rank * BA


# ---------------------------------------------------------------------------------------------- the model's layers
def _parts(model) -> dict[str, nn.Module]:
    """{"unet": ..., "text_encoder": ...} of a StableDiffusion; a lone network is its own part (a CLIP text encoder
    is "text_encoder", any other network "unet")."""
    parts = networks(model, LORA_NETWORKS)
    if not set(parts) <= set(LORA_NETWORKS):
        raise ValueError(f"a LoRA changes a U-Net or a text encoder, not a {type(model).__name__}")
    return parts


def _layers(model: nn.Module) -> dict[str, nn.Module]:
    """{path: layer} of every nn.Linear / nn.Conv2d a LoRA can change; a layer already wrapped counts once, by the
    wrapper's path (its base, A and B are not separate targets)."""
    out, inside = {}, ()
    for name, m in model.named_modules():
        if inside and name.startswith(inside):
            continue
        if isinstance(m, LoRALayer):
            out[name], inside = m, name + "."
        elif isinstance(m, tuple(LORA_LAYERS)):
            out[name] = m
    return out


def _their_names(fmt: str, part: str, path: str, model: nn.Module) -> list[str]:
    """Our module path -> the module names a layout gives it (the first is the one written)."""
    if fmt == DIFFUSERS:
        if part == "unet":
            return ["unet." + path]
        return ["text_encoder.text_model." + path, "text_encoder." + path]
    flat = path.replace(".", "_")
    if part == "text_encoder":
        return ["lora_te_text_model_" + flat]
    names = ["lora_unet_" + flat]
    config = getattr(model, "config", None)
    try:  # the CompVis spelling: model.diffusion_model.input_blocks.1.1.… without its prefix and ".weight"
        ldm = keymaps.compvis_unet(path + ".weight", config)[0]
        names.append("lora_unet_" + ldm[len("model.diffusion_model."):-len(".weight")].replace(".", "_"))
    except (KeyError, AttributeError, TypeError):
        pass  # not minidiff's U-Net (or a layer LDM has no name for): the diffusers spelling only
    return names


# ---------------------------------------------------------------------------------------------- reading
def read_file(path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A LoRA file -> (tensors, safetensors header). .safetensors, or a pickle (.pt/.bin/.ckpt) read weights-only
    (minidiff/formats/weights.py, the reader every weights file goes through)."""
    return read_state_dict(path)


def read_lora(path) -> tuple[dict[str, torch.Tensor], dict]:
    """A LoRA file -> ({key: tensor}, minidiff's metadata {"rank", "alpha", ...} or {} for a file written
    elsewhere)."""
    tensors, header = read_file(path)
    return tensors, json.loads(header.get(MINIDIFF_KEY, "{}"))


def detect_format(keys, file="LoRA file") -> str:
    """"kohya" when every key is lora_unet_… / lora_te_…; "diffusers" when the keys carry lora_A/lora_B (or the older
    diffusers spellings); anything else is refused, naming the first key."""
    keys = list(keys)
    if not keys:
        raise LoRAFileError(f"{file}: holds no tensors")
    if all(k.startswith(("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")) for k in keys):
        if any(k.startswith(("lora_te1_", "lora_te2_")) for k in keys):
            raise LoRAFileError(f"{file}: an SDXL LoRA (key {next(k for k in keys if k.startswith('lora_te'))!r}, "
                                f"two text encoders); minidiff loads SD v1 LoRAs")
        return KOHYA
    if any(re.search(r"lora_[AB]\.|\.lora\.(down|up)\.|_lora\.(down|up)\.|lora_linear_layer", k) for k in keys):
        return DIFFUSERS
    raise LoRAFileError(f"{file}: not a LoRA file this loader knows (first key {keys[0]!r}; expected "
                        f"diffusers/PEFT 'unet.….lora_A.weight' or kohya/A1111 'lora_unet_….lora_down.weight')")


_OLD_DIFFUSERS = [(".processor.", "."), ("_lora.down.", ".lora.down."), ("_lora.up.", ".lora.up."),
                  (".to_out.lora.", ".to_out.0.lora."), (".lora_linear_layer.", ".lora."),
                  (".lora.down.weight", ".lora_A.weight"), (".lora.up.weight", ".lora_B.weight")]
_TEXT_ATTN = {".to_q.": ".q_proj.", ".to_k.": ".k_proj.", ".to_v.": ".v_proj.", ".to_out.0.": ".out_proj."}


def _peft_key(key: str) -> str:
    """An older diffusers key (attention processors, lora_linear_layer) in PEFT's spelling; PEFT keys unchanged."""
    for old, new in _OLD_DIFFUSERS:
        key = key.replace(old, new)
    if not key.startswith(("unet.", "text_encoder.")):
        key = "unet." + key  # the first diffusers LoRA files held the U-Net's keys alone, unprefixed
    if key.startswith("text_encoder."):   # the old processors named CLIP's projections like the U-Net's
        for old, new in _TEXT_ATTN.items():
            key = key.replace(old, new)
    return key


def _peft_config(header: dict, part: str) -> dict | None:
    """The part's LoraConfig from diffusers' header ({"unet.r": 4, ...} -> {"r": 4, ...}), or None."""
    if METADATA_KEY not in header:
        return None
    meta = json.loads(header[METADATA_KEY])
    return {k[len(part) + 1:]: v for k, v in meta.items() if k.startswith(part + ".")} or None


def _pattern_value(patterns: dict, names: list[str]):
    """PEFT's rank_pattern / alpha_pattern lookup (peft.utils.other.get_pattern_key): a key matches a module whose
    name is the key or ends with "." + key (keys are regular expressions)."""
    for key, value in (patterns or {}).items():
        if any(re.match(rf"(.*\.)?({key})$", n) for n in names):
            return value
    return None


def _diffusers_alpha(config: dict | None, minidiff: dict, part: str, path: str, rank: int, file) -> float:
    if config is None:  # no PEFT header: minidiff's own note (files from minidiff before the header), else α = r
        return float(minidiff.get("alpha", rank)) if part == "unet" else float(rank)
    if config.get("use_dora"):
        raise LoRAFileError(f"{file}: a DoRA adapter ({part}.use_dora); minidiff reads plain LoRA")
    names = [path, "text_model." + path] if part == "text_encoder" else [path]
    alpha = _pattern_value(config.get("alpha_pattern"), names)
    alpha = float(config.get("lora_alpha", 8) if alpha is None else alpha)  # 8: LoraConfig's default
    if config.get("use_rslora"):  # rank-stabilised LoRA scales by α/√r: the same as α·√r over r
        alpha *= math.sqrt(rank)
    return alpha


def parse_lora(model, tensors: dict, header: dict | None = None, file="LoRA file") -> list[LoRAEntry]:
    """The file's tensors -> one LoRAEntry per layer of `model` (a StableDiffusion or one network), checked:
    every key must name a layer (LoRAFileError naming the key), every A must have its B, the shapes must fit."""
    header = header or {}
    fmt = detect_format(tensors, file)
    parts = _parts(model)
    where = {}  # their module name -> (part, our path)
    for part, net in parts.items():
        for path in _layers(net):
            for name in _their_names(fmt, part, path, net):
                where[name] = (part, path)
    suffixes = {DIFFUSERS: {".lora_A.weight": "A", ".lora_B.weight": "B"},
                KOHYA: {".lora_down.weight": "A", ".lora_up.weight": "B", ".alpha": "alpha"}}[fmt]
    groups: dict[tuple[str, str], dict] = {}
    for key, t in tensors.items():
        name = _peft_key(key) if fmt == DIFFUSERS else key
        suffix = next((s for s in suffixes if name.endswith(s)), None)
        if suffix is None:
            what = ("a DoRA/bias/other adapter tensor" if fmt == DIFFUSERS else
                    "a LyCORIS variant (LoHa, LoKr, Tucker, DoRA) or a kohya extra" if fmt == KOHYA else "")
            raise LoRAFileError(f"{file}: key {key!r} is not a LoRA A/B/alpha tensor ({what}; not supported)")
        module = name[:-len(suffix)]
        if module not in where:
            have = ", ".join(parts)
            raise LoRAFileError(f"{file}: key {key!r} maps to no layer of the model ({have}): no module {module!r}")
        part_path = where[module]
        if suffixes[suffix] in groups.setdefault(part_path, {"key": key}):
            raise LoRAFileError(f"{file}: key {key!r} duplicates another spelling of the same layer "
                                f"({part_path[0]}.{part_path[1]})")
        groups[part_path][suffixes[suffix]] = t
    configs = {part: _peft_config(header, part) for part in parts}
    minidiff = json.loads(header.get(MINIDIFF_KEY, "{}"))
    entries = []
    for (part, path), g in groups.items():
        if "A" not in g or "B" not in g:
            missing = "A (down)" if "A" not in g else "B (up)"
            raise LoRAFileError(f"{file}: {g['key']!r} has no matching {missing} tensor")
        A, B = g["A"], g["B"]
        rank = A.shape[0]
        if fmt == KOHYA:
            alpha = float(g["alpha"].item()) if "alpha" in g else float(rank)
        else:
            alpha = _diffusers_alpha(configs[part], minidiff, part, path, rank, file)
        W = _base(parts[part].get_submodule(path)).weight
        # ΔW = B A as matrices: [out, r] @ [r, in·k·k] must be W flattened to [out, in·k·k]
        if B.flatten(1).shape[1] != rank or (B.shape[0], A[0].numel()) != tuple(W.flatten(1).shape):
            raise LoRAFileError(f"{file}: {g['key']!r}: A {tuple(A.shape)} and B {tuple(B.shape)} do not make a "
                                f"change of {part}.{path}'s weight {tuple(W.shape)}")
        entries.append(LoRAEntry(part, path, A, B, alpha))
    return entries


def _base(layer: nn.Module) -> nn.Module:
    return layer.base if isinstance(layer, LoRALayer) else layer


# ---------------------------------------------------------------------------------------------- into a model
@torch.no_grad()
def apply_lora(pipe, path, scale: float = 1.0):
    """Add a LoRA file (diffusers/PEFT or kohya/A1111, detected from its keys) to a loaded model, merged into its
    weights: W ← W + scale · (α/r) · B A for every layer it names (in place), U-Net and text encoder alike (as
    diffusers' fuse_lora(lora_scale=scale)). pipe: a StableDiffusion, or one network alone. A layer that is
    LoRA-wrapped gets the change in its base weight. Returns pipe."""
    tensors, header = read_file(path)
    parts = _parts(pipe)
    for e in parse_lora(pipe, tensors, header, path):
        w = _base(parts[e.part].get_submodule(e.path)).weight
        w += e.delta(scale).reshape(w.shape).to(w.device, w.dtype)
    return pipe


@torch.no_grad()
def load_lora(pipe, path, scale: float = 1.0) -> dict[str, LoRALayer]:
    """Like apply_lora, but as LoRA layers (not merged): every layer the file names is wrapped in a LoRA layer
    holding the file's A, B, α at strength `scale`, which can change later (set_lora_scale); merge_lora /
    unmerge_lora fold it in and out. Returns {"unet.<path>" | "text_encoder.<path>": layer}."""
    tensors, header = read_file(path)
    parts = _parts(pipe)
    entries = parse_lora(pipe, tensors, header, path)
    for e in entries:
        if isinstance(parts[e.part].get_submodule(e.path), LoRALayer):
            raise LoRAFileError(f"{path}: {e.part}.{e.path} already carries a LoRA layer; merge_lora() it first "
                                f"or use apply_lora to add this one into the weights")
    out = {}
    for e in entries:
        layer = wrap_layer(parts[e.part], e.path, e.rank, e.alpha)
        layer.lora_A.weight.copy_(e.A.reshape(layer.lora_A.weight.shape))
        layer.lora_B.weight.copy_(e.B.reshape(layer.lora_B.weight.shape))
        layer.scale = float(scale)
        out[f"{e.part}.{e.path}"] = layer
    return out


# ---------------------------------------------------------------------------------------------- writing
def _peft_config_for(layers: dict[str, LoRALayer], part: str) -> dict:
    """A complete PEFT LoraConfig (as LoraConfig.to_dict() would give the fields diffusers reads) for these layers:
    the most common rank and α as r / lora_alpha, the others in rank_pattern / alpha_pattern, every path a target."""
    # the text encoder's paths without "text_model.": they match both the flattened transformers-5 module names
    # and the older ones (PEFT matches a target against the end of a module name)
    ranks = {p: m.rank for p, m in layers.items()}
    alphas = {p: m.alpha for p, m in layers.items()}
    r = Counter(ranks.values()).most_common(1)[0][0]
    a = Counter(alphas.values()).most_common(1)[0][0]
    return {"peft_type": "LORA", "task_type": None, "r": r, "lora_alpha": a,
            "target_modules": sorted(layers), "exclude_modules": None,
            "rank_pattern": {p: v for p, v in ranks.items() if v != r},
            "alpha_pattern": {p: v for p, v in alphas.items() if v != a},
            "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
            "init_lora_weights": True, "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None,
            "lora_bias": False}


def _leaves(paths) -> list[str]:
    """The target names the paths end with ('…attn1.to_q' -> 'to_q', '…to_out.0' -> 'to_out.0')."""
    return sorted({".".join(p.split(".")[-2:]) if p.split(".")[-1].isdigit() else p.split(".")[-1] for p in paths})


def save_lora(model, path, format: str = DIFFUSERS, extra_metadata: dict | None = None) -> Path:
    """Write the LoRA layers `model` carries (a StableDiffusion: U-Net and text encoder; one network: its own) to a
    .safetensors file in the diffusers/PEFT or the kohya/A1111 layout. Written to a temporary name, then renamed."""
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    parts = {part: lora_layers(net) for part, net in _parts(model).items()}
    parts = {part: layers for part, layers in parts.items() if layers}
    if not parts:
        raise ValueError("the model has no LoRA layers to save (inject_lora or load_lora first)")
    tensors, peft_meta = {}, {}
    for part, layers in parts.items():
        net = _parts(model)[part]
        for p, m in layers.items():
            A = m.lora_A.weight.detach().cpu().contiguous()
            B = m.lora_B.weight.detach().cpu().contiguous()
            name = _their_names(format, part, p, net)[0]
            if format == DIFFUSERS:
                tensors[f"{name}.lora_A.weight"], tensors[f"{name}.lora_B.weight"] = A, B
            else:
                tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"] = A, B
                tensors[f"{name}.alpha"] = torch.tensor(m.alpha, dtype=torch.float32)
        if format == DIFFUSERS:
            peft_meta.update({f"{part}.{k}": v for k, v in _peft_config_for(layers, part).items()})
    every = [m for layers in parts.values() for m in layers.values()]
    rank = Counter(m.rank for m in every).most_common(1)[0][0]
    alpha = Counter(m.alpha for m in every).most_common(1)[0][0]
    header = {"format": "pt", MINIDIFF_KEY: json.dumps(
        {"rank": rank, "alpha": alpha, "targets": _leaves(p for layers in parts.values() for p in layers),
         "parts": sorted(parts), **(extra_metadata or {})})}
    if format == DIFFUSERS:
        header[METADATA_KEY] = json.dumps(peft_meta, indent=2, sort_keys=True)
    else:  # kohya's own training notes, which A1111's and ComfyUI's UIs show
        header.update({"ss_network_module": "networks.lora", "ss_network_dim": str(rank),
                       "ss_network_alpha": str(alpha)})
    return atomic_write(Path(path), lambda tmp: save_file(tensors, str(tmp), metadata=header))
