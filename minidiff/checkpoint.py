"""Loading and saving whole text-to-image models in the published layouts.

    pipe = load("stable-diffusion-v1-4/")        # a diffusers folder (today's or the 2022 names; .safetensors or .bin)
    pipe = load("sd-v1-4.ckpt")                  # a CompVis single file (pickle holding `state_dict`) ...
    pipe = load("sd-v1-4.safetensors")           # ... or its .safetensors twin
    pipe = load()                                # the tiny embedded model in weights/minidiff-shapes
    save(pipe, "out/", format="diffusers")       # or format="compvis": one .safetensors file

Every tensor of the file is accounted for before any model is touched: each file key must map to a parameter (or be
one of the known non-weights, see keymaps.COMPVIS_SKIP), each parameter must be found, each shape must match;
otherwise `CheckpointError` names the file and the first offending key, and nothing is returned half-loaded.
The files are read by minidiff/formats/weights.py (pickles with torch's weights-only unpickler), the key rules live in
minidiff/formats/keymaps.py and the config.json translation in minidiff/formats/configs.py; the model classes know
nothing about files.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import save_file

from .clip import CLIPTextConfig, CLIPTextTransformer
from .files import atomic_dir, atomic_write
from .formats import keymaps
from .formats.weights import CheckpointError, read_state_dict
from .pipeline import StableDiffusion
from .schedulers import SD_V1_CONFIG
from .tokenizer import CLIPTokenizer
from .unet import UNet, UNetConfig
from .validation import check_config
from .vae import AutoencoderKL, VAEConfig

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = REPO_ROOT / "weights" / "minidiff-shapes"


# --------------------------------------------------------------------------------------------------- key matching
def _assign(file, tensors: dict, parts: list, skip: re.Pattern) -> list[dict]:
    """Sort the file's tensors into one state_dict per model.

    parts: [(model, names_fn)], names_fn(our_key) -> the file's names for it (first = canonical).
    Raises CheckpointError for an unknown key, a missing parameter, a wrong shape or a non-float weight.
    """
    ours_sd = [model.state_dict() for model, _ in parts]  # once: state_dict() walks the whole module tree
    where = {}  # file key -> (part index, our key)
    for i, (model, names_fn) in enumerate(parts):
        for ours in ours_sd[i]:
            for theirs in names_fn(ours):
                where[theirs] = (i, ours)
    out = [{} for _ in parts]
    for theirs, tensor in tensors.items():
        if theirs not in where:
            if skip.match(theirs):
                continue
            raise CheckpointError(f"{file}: unexpected key {theirs!r} (not part of an SD v1 model; "
                                  f"is this another architecture?)")
        i, ours = where[theirs]
        expected = ours_sd[i][ours].shape
        if keymaps.is_compvis_vae_attention(theirs) and tensor.shape == (*expected, 1, 1):
            tensor = tensor[:, :, 0, 0]  # LDM's 1x1-conv attention projections -> our Linear weights
        if tensor.shape != expected:
            raise CheckpointError(f"{file}: shape mismatch for {theirs!r}: file has {tuple(tensor.shape)}, "
                                  f"the model expects {tuple(expected)}")
        if ours_sd[i][ours].is_floating_point() and not tensor.is_floating_point():
            raise CheckpointError(f"{file}: {theirs!r} has dtype {tensor.dtype}; a weight must be floating point "
                                  f"(float32, float16 or bfloat16)")
        if ours in out[i]:
            raise CheckpointError(f"{file}: {theirs!r} duplicates another spelling of the same weight ({ours!r})")
        out[i][ours] = tensor
    for (model, names_fn), sd, got in zip(parts, ours_sd, out):
        for ours in sd:
            if ours not in got:
                raise CheckpointError(f"{file}: missing key {names_fn(ours)[0]!r}")
    return out


def _build(cls, config, state_dict, dtype, device):
    """Instantiate without allocating random weights (meta device), then take the checked tensors as parameters."""
    with torch.device("meta"):
        model = cls(config)
    model.load_state_dict({k: v.to(dtype) if v.is_floating_point() else v for k, v in state_dict.items()},
                          strict=True, assign=True)
    return model.to(device).eval().requires_grad_(False)


# --------------------------------------------------------------------------------------------------- load
def load(path=None, device="cpu", dtype=torch.float32, ema: bool = False, unsafe_pickle: bool = False,
         compile: bool = False) -> StableDiffusion:
    """Load a text-to-image model: a diffusers folder, a CompVis .ckpt / .safetensors, or (no path) the embedded model.

    dtype: parameters' dtype. With float16 the VAE stays in float32 (fp16 decodes overflow to black images).
    ema: for a CompVis file that carries EMA weights (`model_ema.*`), load the U-Net from those.
    unsafe_pickle: allow pickles that need arbitrary code (only for files you trust).
    compile: torch.compile the U-Net, VAE decoder and text encoder.
    """
    if path is None:
        path = DEFAULT_MODEL
        if not (path / "model_index.json").is_file():
            raise CheckpointError(f"{path}: the embedded default model is missing; rebuild it with "
                                  f"`minidiff train-tiny --out {path}` or pass a model path")
    path = Path(path)
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise CheckpointError(f"{path}: a folder but not a diffusers model (no model_index.json)")
        pipe = _load_diffusers(path, device, dtype, unsafe_pickle)
    elif path.is_file():
        pipe = _load_compvis(path, device, dtype, ema, unsafe_pickle)
    else:
        raise CheckpointError(f"{path}: no such file or folder")
    if compile:
        from .speed import compile_pipeline
        compile_pipeline(pipe)
    return pipe


def vae_scale_factor(path=None) -> int | None:
    """The VAE's downsampling factor f (pixels per latent pixel) of the model load(path) gives, read without a single
    weight: from vae/config.json (a diffusers folder) or a .safetensors header (the configs minidiff.save writes there,
    else the names of the encoder's levels). None when only loading can tell (a pickle) or when the files are not
    what load() takes (load says why). The settings' door uses it to refuse a --resolution before the model loads."""
    from safetensors import SafetensorError
    from safetensors.torch import safe_open
    path = DEFAULT_MODEL if path is None else Path(path)
    try:
        if path.is_dir():
            levels = len(_read_json(path / "vae" / "config.json")["block_out_channels"])
        elif path.suffix == ".safetensors" and path.is_file():
            with safe_open(str(path), framework="pt") as f:
                meta, keys = f.metadata() or {}, list(f.keys())
            if "minidiff" in meta:
                levels = len(json.loads(meta["minidiff"])["vae"]["block_out_channels"])
            else:
                levels = 1 + max(int(m[1]) for k in keys
                                 if (m := re.match(r"first_stage_model\.encoder\.down\.(\d+)\.", k)))
        else:
            return None
    except (CheckpointError, OSError, ValueError, KeyError, TypeError, SafetensorError):
        return None
    return 2 ** (levels - 1)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON: {e}") from None


def _config(from_fn, path: Path, kind: str):
    """Read and check one config.json (types and ranges key by key: validation.check_config), then build it."""
    d = _read_json(path)
    try:
        check_config(kind, d, path)
        return from_fn(d)
    except (ValueError, TypeError, KeyError) as e:
        raise _named(path, "unsupported model configuration", e) from None


def _named(where, what: str, e: Exception) -> CheckpointError:
    """e as a CheckpointError whose message starts with the file (check_config's messages already do)."""
    if isinstance(e, CheckpointError):
        return e
    return CheckpointError(str(e) if str(e).startswith(str(where)) else f"{where}: {what}: {e}")


def _scheduler_config(d, where) -> dict:
    """A scheduler_config.json dict, checked now (types, ranges, and that its sampler builds) rather than at the
    first generate()."""
    from .schedulers import make_scheduler, scheduler_name
    try:
        check_config("scheduler", d, where)
        make_scheduler(scheduler_name(d), d)
    except (ValueError, TypeError, NotImplementedError) as e:
        raise _named(where, "unsupported scheduler configuration", e) from None
    return d


def _weights_file(folder: Path, stem: str) -> Path:
    for name in (f"{stem}.safetensors", f"{stem}.bin" if stem != "model" else "pytorch_model.bin"):
        if (folder / name).is_file():
            return folder / name
    variants = sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin"))
    if len(variants) == 1:  # e.g. diffusion_pytorch_model.fp16.safetensors alone
        return variants[0]
    raise CheckpointError(f"{folder}: no weights file ({stem}.safetensors or .bin)")


def _load_diffusers(path: Path, device, dtype, unsafe_pickle) -> StableDiffusion:
    index = _read_json(path / "model_index.json")
    if not isinstance(index, dict):
        raise CheckpointError(f"{path / 'model_index.json'}: expected a JSON object, got {type(index).__name__}")
    for key in ("text_encoder_2", "tokenizer_2", "prior", "image_encoder"):
        if index.get(key) and index[key][0]:
            raise CheckpointError(f"{path / 'model_index.json'}: has {key!r}: not an SD v1 model (SDXL or other)")
    unet_cfg = _config(UNetConfig.from_diffusers, path / "unet" / "config.json", "unet")
    vae_cfg = _config(VAEConfig.from_diffusers, path / "vae" / "config.json", "vae")
    text_cfg = _config(CLIPTextConfig.from_transformers, path / "text_encoder" / "config.json", "text_encoder")
    if text_cfg.hidden_size != unet_cfg.cross_attention_dim:
        raise CheckpointError(f"{path / 'text_encoder' / 'config.json'}: hidden_size {text_cfg.hidden_size} does not "
                              f"match the U-Net's cross_attention_dim {unet_cfg.cross_attention_dim}")
    sched_file = path / "scheduler" / "scheduler_config.json"
    scheduler_cfg = _scheduler_config(_read_json(sched_file), sched_file) if sched_file.is_file() \
        else dict(SD_V1_CONFIG)

    with torch.device("meta"):
        skeletons = {"unet": UNet(unet_cfg), "vae": AutoencoderKL(vae_cfg), "text_encoder": CLIPTextTransformer(text_cfg)}
    names = {"unet": keymaps.diffusers_unet, "vae": keymaps.diffusers_vae, "text_encoder": keymaps.diffusers_text}
    stems = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": "model"}
    states = {}
    for part in skeletons:  # read and check all three before building any
        file = _weights_file(path / part, stems[part])
        tensors, _ = read_state_dict(file, unsafe_pickle)
        states[part], = _assign(file, tensors, [(skeletons[part], names[part])], keymaps.DIFFUSERS_SKIP)
    tokenizer = CLIPTokenizer.from_dir(path / "tokenizer") if (path / "tokenizer").is_dir() else CLIPTokenizer()
    return _assemble(tokenizer, (unet_cfg, vae_cfg, text_cfg), states, scheduler_cfg, device, dtype)


def _assemble(tokenizer, configs, states, scheduler_cfg, device, dtype) -> StableDiffusion:
    unet_cfg, vae_cfg, text_cfg = configs
    vae_dtype = torch.float32 if dtype == torch.float16 else dtype
    return StableDiffusion(
        tokenizer=tokenizer,
        text_encoder=_build(CLIPTextTransformer, text_cfg, states["text_encoder"], dtype, device),
        unet=_build(UNet, unet_cfg, states["unet"], dtype, device),
        vae=_build(AutoencoderKL, vae_cfg, states["vae"], vae_dtype, device),
        scheduler_config=scheduler_cfg)


def _load_compvis(path: Path, device, dtype, ema, unsafe_pickle) -> StableDiffusion:
    sd, metadata = read_state_dict(path, unsafe_pickle)
    _refuse_other_architectures(path, sd)
    if "minidiff" in metadata:  # written by minidiff.save: the exact configs travel in the file
        unet_cfg, vae_cfg, text_cfg, scheduler_cfg = _metadata_configs(path, metadata["minidiff"])
    else:
        unet_cfg, vae_cfg, text_cfg = infer_compvis_configs(path, sd)
        scheduler_cfg = dict(SD_V1_CONFIG)
    has_ema = any(k.startswith("model_ema.") and not keymaps.COMPVIS_SKIP.match(k) for k in sd)
    if ema and not has_ema:
        raise CheckpointError(f"{path}: ema=True but the file has no EMA weights (no 'model_ema.*' tensors)")
    with torch.device("meta"):
        unet, vae, text = UNet(unet_cfg), AutoencoderKL(vae_cfg), CLIPTextTransformer(text_cfg)
    unet_names = keymaps.compvis_unet_ema if ema else keymaps.compvis_unet
    parts = [(unet, lambda k: unet_names(k, unet_cfg)), (vae, lambda k: keymaps.compvis_vae(k, vae_cfg)),
             (text, keymaps.compvis_text)]
    # the U-Net copy we don't load (EMA or raw) is known and skipped, not "unexpected"
    other = r"model\.diffusion_model\..*" if ema else r"model_ema\..*"
    skip = re.compile(f"{keymaps.COMPVIS_SKIP.pattern}|^{other}$")
    s_unet, s_vae, s_text = _assign(path, sd, parts, skip)
    states = {"unet": s_unet, "vae": s_vae, "text_encoder": s_text}
    return _assemble(CLIPTokenizer(), (unet_cfg, vae_cfg, text_cfg), states, scheduler_cfg, device, dtype)


def _metadata_configs(path: Path, text: str):
    """The configs minidiff.save wrote into a .safetensors header, checked as the config.json files are."""
    try:
        meta = json.loads(text)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: the 'minidiff' metadata is not valid JSON: {e}") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: the 'minidiff' metadata is not a JSON object")
    configs = []
    for kind, from_fn in (("unet", UNetConfig.from_diffusers), ("vae", VAEConfig.from_diffusers),
                          ("text_encoder", CLIPTextConfig.from_transformers)):
        where = f"{path} (metadata 'minidiff', {kind!r})"
        if kind not in meta:
            raise CheckpointError(f"{where}: missing")
        try:
            check_config(kind, meta[kind], where)
            configs.append(from_fn(meta[kind]))
        except (ValueError, TypeError, KeyError) as e:
            raise _named(where, "unsupported model configuration", e) from None
    scheduler = _scheduler_config(meta.get("scheduler", dict(SD_V1_CONFIG)),
                                  f"{path} (metadata 'minidiff', 'scheduler')")
    return (*configs, scheduler)


def _refuse_other_architectures(path, sd):
    keys = list(sd)
    if any(k.startswith("conditioner.embedders.") for k in keys):
        raise CheckpointError(f"{path}: SDXL checkpoint (key {next(k for k in keys if k.startswith('conditioner.'))!r});"
                              f" minidiff loads SD v1 models")
    if any(k.startswith("cond_stage_model.model.") for k in keys):
        raise CheckpointError(f"{path}: SD 2.x checkpoint (OpenCLIP text encoder, key "
                              f"{next(k for k in keys if k.startswith('cond_stage_model.model.'))!r}); minidiff loads SD v1 models")
    if not any(k.startswith("model.diffusion_model.") for k in keys):
        first = keys[0] if keys else "(none)"
        raise CheckpointError(f"{path}: not a CompVis SD checkpoint (no 'model.diffusion_model.*' keys; first key {first!r})")


def infer_compvis_configs(path, sd: dict):
    """Read the architecture off the tensor shapes of a CompVis file (the file carries no config).

    What shapes cannot tell is taken from SD v1's published config: 8 attention heads, 32 norm groups,
    64-wide CLIP heads, 64x64 latents. Widths those do not divide raise CheckpointError naming the key and shape
    (never a wrong head count, never torch's GroupNorm message)."""
    p, v, t = "model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer.text_model."
    if not any(k.startswith(t) for k in sd):
        t = "cond_stage_model.transformer."
    try:
        downs = sorted(int(m[1]) for k in sd if (m := re.fullmatch(re.escape(p) + r"input_blocks\.(\d+)\.0\.op\.weight", k)))
        L = downs[0] - 1 if downs else max(int(k.split(".")[2]) for k in sd if k.startswith(p + "input_blocks."))
        levels = len(downs) + 1
        first = [1 + i * (L + 1) for i in range(levels)]
        to_k = next(k for k in sd if k.startswith(p) and k.endswith("attn2.to_k.weight"))
        vlevels = 1 + _max_index(sd, re.escape(v) + r"encoder\.down\.(\d+)\.")
        _check_sd_v1_widths(path, sd, (
            [(f"{p}input_blocks.{n}.0.out_layers.3.weight", 0, 32, "SD v1's U-Net has 32 GroupNorm groups, 8 heads")
             for n in first] +
            [(f"{v}encoder.down.{i}.block.0.conv2.weight", 0, 32, "SD v1's VAE has 32 GroupNorm groups")
             for i in range(vlevels)] +
            [(t + "embeddings.token_embedding.weight", 1, 64, "SD v1's CLIP text encoder has 64-wide heads")]))
        unet = UNetConfig(
            in_channels=sd[p + "input_blocks.0.0.weight"].shape[1],
            out_channels=sd[p + "out.2.weight"].shape[0],
            block_out_channels=tuple(sd[f"{p}input_blocks.{n}.0.out_layers.3.weight"].shape[0] for n in first),
            layers_per_block=L,
            cross_attention=tuple(f"{p}input_blocks.{n}.1.proj_in.weight" in sd for n in first),
            cross_attention_dim=sd[to_k].shape[1])
        vae = VAEConfig(
            in_channels=sd[v + "encoder.conv_in.weight"].shape[1],
            out_channels=sd[v + "decoder.conv_out.weight"].shape[0],
            block_out_channels=tuple(sd[f"{v}encoder.down.{i}.block.0.conv2.weight"].shape[0] for i in range(vlevels)),
            layers_per_block=1 + _max_index(sd, re.escape(v) + r"encoder\.down\.0\.block\.(\d+)\."),
            latent_channels=sd[v + "post_quant_conv.weight"].shape[0])
        tok = sd[t + "embeddings.token_embedding.weight"]
        width = tok.shape[1]
        text = CLIPTextConfig(
            vocab_size=tok.shape[0], hidden_size=width,
            intermediate_size=sd[t + "encoder.layers.0.mlp.fc1.weight"].shape[0],
            num_hidden_layers=1 + _max_index(sd, re.escape(t) + r"encoder\.layers\.(\d+)\."),
            num_attention_heads=width // 64,
            max_position_embeddings=sd[t + "embeddings.position_embedding.weight"].shape[0])
    except (KeyError, StopIteration) as e:
        raise CheckpointError(f"{path}: cannot read an SD v1 architecture from the file's shapes (missing {e})") from None
    except (ValueError, IndexError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{path}: the file's shapes do not fit SD v1's architecture: {e}") from None
    return unet, vae, text


def _max_index(sd: dict, pattern: str) -> int:
    """The largest number that `pattern`'s group 1 captures at the start of a key; -1 when no key matches."""
    return max((int(m[1]) for k in sd if (m := re.match(pattern, k))), default=-1)


def _check_sd_v1_widths(path, sd, widths):
    """widths: [(key, dim, divisor, why)]: the size of dimension `dim` of the key's tensor must divide by `divisor`."""
    for key, dim, divisor, why in widths:
        shape = tuple(sd[key].shape)
        width = shape[dim] if len(shape) > dim else None
        if width is None or width % divisor:
            raise CheckpointError(f"{path}: {key!r} has shape {shape}: its width {width} is not a multiple of "
                                  f"{divisor} ({why}); this file does not fit SD v1's architecture")


# --------------------------------------------------------------------------------------------------- save
def save(pipe: StableDiffusion, path, format: str = "diffusers") -> Path:
    """Write `pipe` as a diffusers folder (loadable by diffusers' StableDiffusionPipeline.from_pretrained) or, with
    format="compvis", as one CompVis-layout .safetensors file. Written to a temporary name, then renamed."""
    path = Path(path)
    if format == "diffusers":
        _atomic_dir(path, lambda tmp: _write_diffusers(pipe, tmp))
    elif format == "compvis":
        if path.suffix != ".safetensors":
            raise ValueError(f"format='compvis' writes one .safetensors file; got {path}")
        _write_compvis(pipe, path)
    else:
        raise ValueError(f"format must be 'diffusers' or 'compvis', got {format!r}")
    return path


def _export(model, names_fn) -> dict:
    return {names_fn(k)[0]: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}


def _write_diffusers(pipe: StableDiffusion, root: Path):
    index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.1",
             "feature_extractor": [None, None], "safety_checker": [None, None], "requires_safety_checker": False,
             "scheduler": ["diffusers", pipe.scheduler_config.get("_class_name", "PNDMScheduler")],
             "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}
    parts = {"unet": (pipe.unet, keymaps.diffusers_unet, "diffusion_pytorch_model", pipe.unet.config.to_diffusers()),
             "vae": (pipe.vae, keymaps.diffusers_vae, "diffusion_pytorch_model", pipe.vae.config.to_diffusers()),
             "text_encoder": (pipe.text_encoder, keymaps.diffusers_text, "model",
                              pipe.text_encoder.config.to_transformers())}
    for name, (model, names_fn, stem, config) in parts.items():
        (root / name).mkdir()
        (root / name / "config.json").write_text(json.dumps(config, indent=2))
        save_file(_export(model, names_fn), str(root / name / f"{stem}.safetensors"), metadata={"format": "pt"})
    (root / "scheduler").mkdir()
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(pipe.scheduler_config, indent=2))
    pipe.tokenizer.save(root / "tokenizer")
    (root / "model_index.json").write_text(json.dumps(index, indent=2))


def _atomic_dir(path: Path, write):
    with atomic_dir(path) as tmp:
        write(tmp)


def _write_compvis(pipe: StableDiffusion, path: Path):
    ucfg, vcfg = pipe.unet.config, pipe.vae.config
    sd = _export(pipe.unet, lambda k: keymaps.compvis_unet(k, ucfg))
    for k, v in _export(pipe.vae, lambda k: keymaps.compvis_vae(k, vcfg)).items():
        sd[k] = v[:, :, None, None] if keymaps.is_compvis_vae_attention(k) else v  # Linear -> 1x1 conv
    sd.update(_export(pipe.text_encoder, keymaps.compvis_text))
    meta = {"unet": ucfg.to_diffusers(), "vae": vcfg.to_diffusers(),
            "text_encoder": pipe.text_encoder.config.to_transformers(), "scheduler": pipe.scheduler_config}
    atomic_write(path, lambda tmp: save_file(sd, str(tmp), metadata={"format": "pt", "minidiff": json.dumps(meta)}))
