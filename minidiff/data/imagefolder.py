"""Chapter 11.1 — the one dataset format of minidiff: a folder of images with a `metadata.jsonl`.

This is Hugging Face's "imagefolder" convention, so the same folder loads with `datasets.load_dataset("imagefolder")`:

    my_set/
      metadata.jsonl        {"file_name": "0001.png", "text": "a yellow electric type pokemon, pikachu", "reviewed": false}
      0001.png              one JSON object per line; "file_name" is relative to the folder, "text" is the caption,
      0002.png              any other key ("reviewed", a source, a licence...) is kept as it is

Three promises make the folder safe to edit while a person is reviewing it:
  * reading never crashes on one bad line: a line that is not JSON, lacks file_name/text, names a file that is not
    there or points outside the folder is skipped with a warning that names the file and the line;
  * writing is atomic: a temp file in the same folder, fsync, then os.replace — a reader (or a kill -9) sees the old
    file or the new one, never half a file;
  * `update_caption` rewrites only the one line it changes; every other line, even one we cannot parse, is kept as is.

`ImageFolderDataset` turns the folder into training samples the way diffusers' train_text_to_image.py does:
resize the shorter side to R, crop R x R (centre or random), optional horizontal flip, scale to [-1, 1]
(x = 2 * pixel / 255 - 1, the range the VAE was trained on).
"""
from __future__ import annotations

import json
import threading
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from ..errors import InputError
from ..files import atomic_write

METADATA = "metadata.jsonl"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")

# One lock per folder: the annotation server saves from several threads, and read-modify-write must not interleave.
# (Two *processes* editing the same folder are not coordinated; run one annotator per folder.)
_LOCKS: dict[str, threading.Lock] = {}
_LOCKS_GUARD = threading.Lock()


class ImageLoadError(InputError, OSError):
    """An image file that cannot be decoded (missing, truncated, not an image). An InputError (minidiff/errors.py):
    the commands print it as one line."""


def _lock_for(folder: Path) -> threading.Lock:
    key = str(folder.resolve())
    with _LOCKS_GUARD:
        return _LOCKS.setdefault(key, threading.Lock())


def resolve_in_folder(folder: str | Path, file_name: str) -> Path | None:
    """The path of `file_name` inside `folder`, or None when the name escapes it.

    Refused: non-strings, empty names, absolute paths, any ".." component, NUL bytes, backslashes, and names whose
    real path (after following symlinks) is outside the folder.
    """
    if not isinstance(file_name, str) or not file_name or "\x00" in file_name or "\\" in file_name:
        return None
    rel = Path(file_name)
    if rel.is_absolute() or file_name.startswith("/") or ".." in rel.parts:
        return None
    root = Path(folder).resolve()
    path = (root / rel).resolve()
    try:
        path.relative_to(root)
    except ValueError:
        return None
    return path


def _read_lines(folder: Path) -> list[str]:
    """The raw lines of metadata.jsonl (newline stripped); [] when the file is empty."""
    path = folder / METADATA
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no {METADATA} here — a dataset folder needs one line per image: "
                                '{"file_name": "...", "text": "..."}')
    with open(path, encoding="utf-8") as f:
        return f.read().splitlines()


def read_metadata(folder: str | Path, check_files: bool = True, warn: bool = True) -> list[dict]:
    """The rows of `folder`/metadata.jsonl that are usable, in file order.

    A row is usable when its line is a JSON object with a string "file_name" and a string "text", the name stays
    inside the folder and (check_files) the file exists. Anything else is skipped with a warning naming the file and
    the line number (warn=False: silently). Extra keys are kept. A file_name seen twice: the first line wins.
    """
    folder = Path(folder)
    rows, seen = [], set()
    where = folder / METADATA
    _warn = warnings.warn if warn else (lambda *a, **k: None)
    for lineno, line in enumerate(_read_lines(folder), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            _warn(f"{where}:{lineno}: skipped, not JSON ({e.msg})", stacklevel=2)
            continue
        if not isinstance(row, dict):
            _warn(f"{where}:{lineno}: skipped, not a JSON object", stacklevel=2)
            continue
        name, text = row.get("file_name"), row.get("text")
        if not isinstance(name, str) or not isinstance(text, str):
            _warn(f"{where}:{lineno}: skipped, needs a string 'file_name' and a string 'text'", stacklevel=2)
            continue
        path = resolve_in_folder(folder, name)
        if path is None:
            _warn(f"{where}:{lineno}: skipped, file_name {name!r} is outside the folder", stacklevel=2)
            continue
        if check_files and not path.is_file():
            _warn(f"{where}:{lineno}: skipped, image {name!r} is missing", stacklevel=2)
            continue
        if name in seen:
            _warn(f"{where}:{lineno}: skipped, {name!r} is listed twice (the first line wins)", stacklevel=2)
            continue
        seen.add(name)
        rows.append(row)
    return rows


def _atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to `path` so that readers see the old or the new content, never a mix (also across a crash)."""
    atomic_write(path, text)


def _dump(row: dict) -> str:
    return json.dumps(row, ensure_ascii=False)


def write_metadata(folder: str | Path, rows: list[dict]) -> None:
    """Replace `folder`/metadata.jsonl with `rows` (one JSON object per line), atomically."""
    folder = Path(folder)
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or not isinstance(row.get("file_name"), str) or not isinstance(row.get("text"), str):
            raise ValueError(f"row {i} needs a string 'file_name' and a string 'text': {row!r}")
    with _lock_for(folder):
        _atomic_write_text(folder / METADATA, "".join(_dump(r) + "\n" for r in rows))


def update_caption(folder: str | Path, file_name: str, text: str, reviewed: bool = True) -> dict:
    """Set the caption of `file_name` (and its "reviewed" flag) in metadata.jsonl, atomically; returns the new row.

    Only that line is rewritten; all other lines are kept byte for byte. Raises KeyError when no line has this
    file_name, TypeError when text is not a string.
    """
    if not isinstance(text, str):
        raise TypeError(f"caption must be a string, got {type(text).__name__}")
    folder = Path(folder)
    with _lock_for(folder):
        lines = _read_lines(folder)
        for i, line in enumerate(lines):
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and row.get("file_name") == file_name:
                row["text"] = text
                row["reviewed"] = bool(reviewed)
                lines[i] = _dump(row)
                _atomic_write_text(folder / METADATA, "".join(l + "\n" for l in lines))
                return row
    raise KeyError(f"{file_name!r} is not listed in {folder / METADATA}")


def _to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB; transparency is composited on white (an RGBA sprite would otherwise get a black background)."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):                # 16/32-bit grey: scale to 8 bits instead of clipping
        a = np.asarray(im, dtype=np.float64)
        scale = 257.0 if im.mode.startswith("I;16") or a.max(initial=0) > 255 else 1.0   # 65535 -> 255
        im = Image.fromarray(np.clip(a / scale, 0, 255).astype(np.uint8))
    if im.mode == "P" and "transparency" in im.info or im.mode in ("PA", "LA", "La", "RGBa"):
        im = im.convert("RGBA")
    if im.mode == "RGBA":
        white = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, im).convert("RGB")
    return im.convert("RGB")


def load_image(path: str | Path, size: int | tuple[int, int] | None = None) -> Image.Image:
    """Open an image as PIL RGB (EXIF rotation applied, alpha on white).

    size: None = as stored; an int = resize so the shorter side is `size` (aspect kept); (W, H) = exactly that size.
    Raises ImageLoadError (an OSError) naming the file when it cannot be read or decoded.
    """
    try:
        with Image.open(path) as im:
            im.load()                                    # decode now, so a truncated file fails here, not later
            im = ImageOps.exif_transpose(im)
            im = _to_rgb(im)
    except Exception as e:                               # PIL raises OSError, SyntaxError, ValueError, ...
        raise ImageLoadError(f"cannot read image {path}: {e}") from e
    if size is not None:
        if isinstance(size, int):
            im = resize_shorter_side(im, size)
        else:
            im = im.resize(tuple(size), Image.BICUBIC)
    return im


def resize_shorter_side(im: Image.Image, size: int) -> Image.Image:
    """Resize so min(W, H) == size, keeping the aspect ratio (torchvision's Resize(int) rounding)."""
    w, h = im.size
    if min(w, h) == size:
        return im
    if w <= h:
        ow, oh = size, int(size * h / w)
    else:
        ow, oh = int(size * w / h), size
    return im.resize((ow, oh), Image.BILINEAR)           # bilinear, as diffusers' training scripts use


def _readable_header(path: Path) -> str | None:
    """None when PIL recognises the file as an image (header only, cheap); else the reason."""
    try:
        with Image.open(path) as im:
            im.size
        return None
    except Exception as e:
        return str(e) or type(e).__name__


class ImageFolderDataset(torch.utils.data.Dataset):
    """A captioned image folder as a torch Dataset.

    ds[i] -> {"pixel_values": FloatTensor [3, R, R] in [-1, 1], "text": str, "input_ids": LongTensor [77] (if tokenizer)}

    folder:       a folder with metadata.jsonl (see read_metadata for what is skipped)
    resolution:   R, the side of the square crop
    center_crop:  True = centre crop; False = random crop (torch RNG, so torch.manual_seed makes it repeatable)
    random_flip:  flip left-right with probability 1/2
    tokenizer:    a callable list[str] -> [B, 77] ids (minidiff.tokenizer.CLIPTokenizer), or None
    Images that cannot be read are skipped with a warning naming the file: unrecognised headers when the dataset is
    built, files that fail to decode when first loaded (that index then yields the next readable image).
    """

    def __init__(self, folder: str | Path, resolution: int, center_crop: bool = True, random_flip: bool = False,
                 tokenizer=None):
        self.folder = Path(folder)
        self.resolution = int(resolution)
        self.center_crop = center_crop
        self.random_flip = random_flip
        self.tokenizer = tokenizer
        self.rows = []
        for row in read_metadata(self.folder):
            reason = _readable_header(self.folder / row["file_name"])
            if reason is None:
                self.rows.append(row)
            else:
                warnings.warn(f"{self.folder / row['file_name']}: skipped, not a readable image ({reason})", stacklevel=2)
        self._broken: set[int] = set()
        if not self.rows:
            warnings.warn(f"{self.folder}: no usable images", stacklevel=2)

    def __len__(self) -> int:
        return len(self.rows)

    def transform(self, im: Image.Image) -> torch.Tensor:
        """PIL RGB -> FloatTensor [3, R, R] in [-1, 1]."""
        R = self.resolution
        im = resize_shorter_side(im, R)
        w, h = im.size
        if self.center_crop:
            left, top = int(round((w - R) / 2.0)), int(round((h - R) / 2.0))
        else:
            left = int(torch.randint(0, w - R + 1, (1,)))
            top = int(torch.randint(0, h - R + 1, (1,)))
        im = im.crop((left, top, left + R, top + R))
        if self.random_flip and torch.rand(()) < 0.5:
            im = im.transpose(Image.FLIP_LEFT_RIGHT)
        x = torch.from_numpy(np.asarray(im, dtype=np.uint8).copy())   # [R, R, 3] uint8
        x = x.permute(2, 0, 1).float()                                  # [3, R, R]
        return x / 127.5 - 1.0                                          # [0, 255] -> [-1, 1]

    def __getitem__(self, i: int) -> dict:
        n = len(self.rows)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for {n} images")
        i %= n
        for k in range(n):                      # a broken image yields the next readable one
            j = (i + k) % n
            if j in self._broken:
                continue
            row = self.rows[j]
            path = self.folder / row["file_name"]
            try:
                im = load_image(path)
            except ImageLoadError as e:
                warnings.warn(f"{path}: skipped, {e}", stacklevel=2)
                self._broken.add(j)
                continue
            item = {"pixel_values": self.transform(im), "text": row["text"]}
            if self.tokenizer is not None:
                ids = self.tokenizer([row["text"]])
                ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
                item["input_ids"] = torch.as_tensor(ids)[0]              # [77]
            return item
        raise ImageLoadError(f"{self.folder}: none of the {n} images can be read")
