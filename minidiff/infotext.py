"""AUTOMATIC1111's "infotext": the settings of an image, written into its PNG as a text chunk named `parameters`.

Every image AUTOMATIC1111's web UI saves carries it, and so does every PNG minidiff writes (`minidiff generate`,
`minidiff serve`), so a picture can be dropped on either page to get back what made it:

    a red circle on a blue square                                   <- the prompt (may span several lines)
    Negative prompt: green                                          <- only when there is one (may span lines)
    Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1234, Size: 32x32, Model hash: 2f1c9a0b7e, Model: minidiff-shapes

The last line is "Key: value" pairs joined by ", ". A value holding "," or ":" or a newline is written as a JSON
string ("..." with JSON escapes), so the line still splits; everything else is written as is. A reader takes the
last line as the settings only when at least three pairs are found on it (else it is part of the prompt), exactly
as AUTOMATIC1111's parse_generation_parameters does, and keeps every key it does not know.

    text = format("a red circle", steps=20, sampler_name="Euler a", cfg_scale=7, seed=1234, width=32, height=32)
    parse(text)  -> {"prompt": "a red circle", "negative_prompt": "", "steps": 20, "sampler_name": "Euler a",
                     "cfg_scale": 7.0, "seed": 1234, "width": 32, "height": 32, "extras": {}}
    fields(text) -> {"Prompt": ..., "Negative prompt": ..., "Steps": "20", ..., "Size-1": "32", "Size-2": "32"}

parse() gives typed values under the names of AUTOMATIC1111's API (steps, cfg_scale, sampler_name, ...) and the keys
it does not know, as text, in "extras"; format(**parse(text)) writes the same settings back. fields() is the
untyped view AUTOMATIC1111's /sdapi/v1/png-info answers with ("Size" split into "Size-1" and "Size-2").
AUTOMATIC1111 1.9+ writes a sampler as two keys, "Sampler: DPM++ 2M, Schedule type: Karras"; parse() joins them
into one name, "DPM++ 2M Karras", the form every version reads, and format() writes that form.
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

PNG_KEY = "parameters"       # the PNG tEXt chunk's keyword
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth")

# AUTOMATIC1111's pattern of one "Key: value" pair on the settings line: a key starts with a word character and holds
# words, spaces, "-" and "/"; a value is a JSON string or anything up to the next comma.
_PAIR = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_SIZE = re.compile(r"^(\d+)x(\d+)$")
_NEGATIVE = "Negative prompt:"

# infotext key -> (parse()'s name, type). The order is the order format() writes them in (AUTOMATIC1111's).
KNOWN = {
    "Steps": ("steps", int),
    "Sampler": ("sampler_name", str),
    "CFG scale": ("cfg_scale", float),
    "Seed": ("seed", int),
    "Size": (("width", "height"), int),
    "Model hash": ("model_hash", str),
    "Model": ("model", str),
    "Denoising strength": ("denoising_strength", float),
}


# ------------------------------------------------------------------------------------------------ values
def quote(value) -> str:
    """A value as the settings line writes it: JSON-quoted when it holds "," ":" or a newline, else as is."""
    text = value if isinstance(value, str) else _number(value)
    if "," in text or ":" in text or "\n" in text:
        return json.dumps(text, ensure_ascii=False)
    return text


def unquote(text: str) -> str:
    """The inverse of quote: a JSON string's content; anything else (or malformed JSON) unchanged."""
    if len(text) >= 2 and text[0] == '"' and text[-1] == '"':
        try:
            return json.loads(text)
        except ValueError:
            return text
    return text


def _number(v) -> str:
    """7.0 -> "7", 7.5 -> "7.5", 20 -> "20" (as people write them; AUTOMATIC1111's UI writes "CFG scale: 7")."""
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v)


# ------------------------------------------------------------------------------------------------ reading
def fields(text: str) -> dict[str, str]:
    """The infotext as AUTOMATIC1111 reads it: {"Prompt", "Negative prompt", and every key of the settings line}, all
    values text, "Size: 512x768" as "Size-1": "512", "Size-2": "768" (keys of AUTOMATIC1111's parse_generation_
    parameters, without the defaults it adds for keys that are absent)."""
    if not isinstance(text, str):
        raise TypeError(f"infotext must be a str, got {type(text).__name__}")
    *lines, last = text.strip().split("\n")
    if len(_PAIR.findall(last)) < 3:        # not a settings line: part of the prompt
        lines.append(last)
        last = ""
    prompt, negative, in_negative = [], [], False
    for line in lines:
        line = line.strip()
        if line.startswith(_NEGATIVE):
            in_negative = True
            line = line[len(_NEGATIVE):].strip()
        (negative if in_negative else prompt).append(line)
    out = {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(negative)}
    for key, value in _PAIR.findall(last):
        value = unquote(value) if value[:1] == '"' and value[-1:] == '"' else value
        size = _SIZE.match(value)
        if size:
            out[f"{key}-1"], out[f"{key}-2"] = size.groups()
        else:
            out[key] = value
    return out


def parse(text: str) -> dict:
    """An infotext -> {"prompt", "negative_prompt", the known settings typed (steps, sampler_name, cfg_scale, seed,
    width, height, model_hash, model, denoising_strength: those present), "extras": {other key: text}}.
    A known key whose value does not convert (e.g. "Steps: many") is kept, as text, in extras."""
    f = fields(text)
    out = {"prompt": f.pop("Prompt"), "negative_prompt": f.pop("Negative prompt")}
    extras = {}
    if "Size-1" in f and "Size-2" in f:
        f["Size"] = (f.pop("Size-1"), f.pop("Size-2"))
    for key, value in f.items():
        name, kind = KNOWN.get(key, (None, None))
        try:
            if name is None:
                raise ValueError
            if key == "Size":
                if not isinstance(value, tuple):   # "Size: big": not W x H
                    raise ValueError
                out["width"], out["height"] = int(value[0]), int(value[1])
            else:
                out[name] = kind(value)
        except ValueError:
            extras[key] = "x".join(value) if isinstance(value, tuple) else value
    schedule = extras.pop("Schedule type", None)   # AUTOMATIC1111 1.9+: "Sampler: DPM++ 2M, Schedule type: Karras"
    if schedule is not None and schedule != "Automatic" and "sampler_name" in out:
        out["sampler_name"] = f"{out['sampler_name']} {schedule}"
    elif schedule is not None and "sampler_name" not in out:
        extras["Schedule type"] = schedule
    out["extras"] = extras
    return out


# ------------------------------------------------------------------------------------------------ writing
def format(prompt: str, negative_prompt: str = "", *, steps: int | None = None, sampler_name: str | None = None,
           cfg_scale: float | None = None, seed: int | None = None, width: int | None = None,
           height: int | None = None, model_hash: str | None = None, model: str | None = None,
           denoising_strength: float | None = None, extras: dict | None = None) -> str:
    """The infotext of one image: the prompt, "Negative prompt: ..." when there is one, then the settings line in
    AUTOMATIC1111's order (settings left None are not written; extras, {key: value}, come last)."""
    values = {"Steps": steps, "Sampler": sampler_name, "CFG scale": cfg_scale, "Seed": seed,
              "Size": f"{width}x{height}" if width is not None and height is not None else None,
              "Model hash": model_hash, "Model": model, "Denoising strength": denoising_strength,
              **(extras or {})}
    for key in values:
        if not _PAIR.fullmatch(f"{key}: x"):
            raise ValueError(f"infotext key {key!r} cannot be read back: a key is a word, then words, spaces, "
                             "'-' or '/'")
    settings = ", ".join(f"{k}: {quote(v)}" for k, v in values.items() if v is not None)
    negative = f"\n{_NEGATIVE} {negative_prompt}" if negative_prompt else ""
    return f"{prompt}{negative}\n{settings}".strip()


def model_hash(path) -> str:
    """SHA-256 (hex) of a model: of the file, as AUTOMATIC1111 hashes a checkpoint (its "Model hash" is the first 10
    digits); of a diffusers folder, over its .json and weight files' relative paths and bytes, in sorted order."""
    path = Path(path)
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(
        p for p in path.rglob("*") if p.is_file() and p.suffix in (".json", *WEIGHT_SUFFIXES))
    for f in files:
        if f != path:
            h.update(str(f.relative_to(path)).encode() + b"\0")
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def read_png(image) -> str | None:
    """The infotext a PIL image carries (its `parameters` text chunk), or None."""
    value = getattr(image, "info", {}).get(PNG_KEY)
    return value if isinstance(value, str) else None


def png_info(text: str):
    """A PngInfo holding `text` as the `parameters` chunk, for image.save(..., pnginfo=png_info(text))."""
    from PIL.PngImagePlugin import PngInfo
    info = PngInfo()
    info.add_text(PNG_KEY, text)
    return info


__all__ = ["PNG_KEY", "KNOWN", "quote", "unquote", "fields", "parse", "format", "model_hash", "read_png", "png_info"]
