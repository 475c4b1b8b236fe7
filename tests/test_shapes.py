"""The shapes dataset (minidiff.data.shapes) and the pixel detector that judges generated images (minidiff.shapes_eval).

The renderer is checked against geometry (areas, extents), not against itself; the detector is then checked to be
exact on every colour × shape × size 12..24 at random positions, with and without anti-aliasing."""
import json
import math

import numpy as np
import pytest

from minidiff.data import shapes
from minidiff.data.shapes import (ALL_PAIRS, COLOURS, HELD_OUT, SHAPES, TRAIN_PAIRS, caption, coverage,
                                  load_dataset, make_dataset, parse_caption, render_shape, sample_specs)
from minidiff.shapes_eval import detect, judge, largest_blob


# ------------------------------------------------------------------------------------------------ rendering
@pytest.mark.parametrize("size", [12, 17, 24])
def test_coverage_areas_match_geometry(size):
    """Summed coverage = the shape's area: s² (square), π s²/4 (circle), s²/2 (triangle), within supersampling error."""
    area = {"square": size ** 2, "circle": math.pi * size ** 2 / 4, "triangle": size ** 2 / 2}
    for shape in SHAPES:
        cov = coverage(shape, size, 3, 5)
        assert cov.min() >= 0 and cov.max() <= 1
        assert cov.sum() == pytest.approx(area[shape], rel=0.02), shape
        rows, cols = np.nonzero(cov)
        # the shape stays inside its bounding box [x, x+size) × [y, y+size)
        assert rows.min() >= 5 and rows.max() < 5 + size and cols.min() >= 3 and cols.max() < 3 + size


def test_render_shape_pixels():
    img = render_shape("blue", "square", 12, 4, 6)
    assert img.shape == (32, 32, 3) and img.dtype == np.uint8
    assert (img[6:18, 4:16] == COLOURS["blue"]).all()                 # inside: the exact colour
    outside = np.ones((32, 32), bool)
    outside[6:18, 4:16] = False
    assert (img[outside] == 255).all()                                  # outside: white
    tri = render_shape("red", "triangle", 20, 0, 0, antialias=False)
    assert (tri[0, 0] == 255).all() and (tri[19, 10] == COLOURS["red"]).all()  # apex corner empty, base middle full
    assert (tri[19, 0] == COLOURS["red"]).all() or (tri[19, 1] == COLOURS["red"]).all()


def test_render_shape_rejects_bad_input():
    with pytest.raises(ValueError):
        render_shape("pink", "circle", 12, 0, 0)
    with pytest.raises(ValueError):
        render_shape("red", "hexagon", 12, 0, 0)
    with pytest.raises(ValueError):
        render_shape("red", "circle", 24, 10, 0)  # 10 + 24 > 32


# ------------------------------------------------------------------------------------------------ dataset
def test_pairs_and_captions():
    assert len(ALL_PAIRS) == 18 and len(TRAIN_PAIRS) == 15
    assert set(HELD_OUT) == {("purple", "triangle"), ("orange", "circle"), ("green", "square")}
    assert caption("red", "circle") == "a red circle"
    assert parse_caption("a purple triangle") == ("purple", "triangle")
    with pytest.raises(ValueError):
        parse_caption("a red hexagon")


def test_specs_cover_training_pairs_and_never_the_held_out_ones():
    specs = sample_specs(3000, seed=1)
    pairs = {(s["colour"], s["shape"]) for s in specs}
    assert pairs == set(TRAIN_PAIRS)
    assert not pairs & set(HELD_OUT)
    assert {s["size"] for s in specs} == set(range(12, 25))
    for s in specs:
        assert 0 <= s["x"] and s["x"] + s["size"] <= 32 and 0 <= s["y"] and s["y"] + s["size"] <= 32
        assert s["text"] == f"a {s['colour']} {s['shape']}"
    xs = [s["x"] for s in specs if s["size"] == 12]
    assert min(xs) == 0 and max(xs) == 20                              # anywhere inside the canvas


def test_make_dataset_is_deterministic_and_readable(tmp_path):
    a = make_dataset(tmp_path / "a", 40, seed=7)
    b = make_dataset(tmp_path / "b", 40, seed=7)
    c = make_dataset(tmp_path / "c", 40, seed=8)
    rows = [json.loads(line) for line in (a / "metadata.jsonl").read_text().splitlines()]
    assert len(rows) == 40 and all({"file_name", "text"} <= set(r) for r in rows)
    assert (a / "metadata.jsonl").read_text() == (b / "metadata.jsonl").read_text()
    assert (a / "metadata.jsonl").read_text() != (c / "metadata.jsonl").read_text()
    images, captions = load_dataset(a)
    images_b, _ = load_dataset(b)
    assert images.shape == (40, 32, 32, 3) and images.dtype == np.uint8
    assert np.array_equal(images, images_b)
    for img, r, text in zip(images, rows, captions):
        assert text == r["text"] == caption(r["colour"], r["shape"])
        assert (r["colour"], r["shape"]) not in HELD_OUT
        # the PNG holds exactly the rendered shape its row describes
        assert np.array_equal(img, render_shape(r["colour"], r["shape"], r["size"], r["x"], r["y"]))


# ------------------------------------------------------------------------------------------------ detector
@pytest.mark.parametrize("antialias", [True, False])
def test_detector_exact_on_ground_truth(antialias):
    rng = np.random.default_rng(0 if antialias else 1)
    n = 0
    for colour in COLOURS:
        for shape in SHAPES:
            for size in range(12, 25):
                x, y = (int(v) for v in rng.integers(0, 33 - size, size=2))
                d = judge(render_shape(colour, shape, size, x, y, antialias=antialias), colour, shape)
                assert d["correct"], (colour, shape, size, x, y, d)
                # the blob's box is the drawn box (a half-covered apex or rim pixel may fall below the threshold)
                assert np.abs(np.subtract(d["bbox"], (y, x, y + size, x + size))).max() <= (0 if shape == "square" else 1)
                n += 1
    assert n == 6 * 3 * 13


def test_detector_accepts_pil_and_tensors():
    torch = pytest.importorskip("torch")
    from PIL import Image
    img = render_shape("yellow", "circle", 20, 6, 2)
    t = torch.from_numpy(img).permute(2, 0, 1).float() / 255     # [3, H, W] in [0, 1], as the pipeline returns
    for x in (img, Image.fromarray(img), t):
        d = detect(x)
        assert (d["colour"], d["shape"], d["clean"]) == ("yellow", "circle", True)


def test_detector_tolerates_noise_but_not_wrong_pictures():
    rng = np.random.default_rng(3)
    for colour, shape in ALL_PAIRS:
        img = render_shape(colour, shape, 16, 8, 8).astype(np.float32)
        noisy = np.clip(img + rng.normal(0, 8, img.shape), 0, 255).astype(np.uint8)   # sampler-like grain
        assert judge(noisy, colour, shape)["correct"], (colour, shape)
    blank = np.full((32, 32, 3), 255, np.uint8)
    assert detect(blank)["shape"] is None and not judge(blank, "red", "circle")["correct"]
    two = np.minimum(render_shape("red", "square", 12, 0, 0), render_shape("red", "square", 12, 18, 18))
    assert not detect(two)["clean"]                                 # two shapes: not one clean shape
    assert not judge(render_shape("red", "circle", 20, 4, 4), "red", "square")["correct"]
    assert not judge(render_shape("orange", "circle", 20, 4, 4), "red", "circle")["correct"]


def test_largest_blob():
    m = np.zeros((6, 6), bool)
    m[0, 0] = m[0, 1] = True          # a blob of 2
    m[3:6, 3:6] = True                # a blob of 9
    m[2, 2] = True                    # touches the 9-blob only diagonally: not 4-connected
    b = largest_blob(m)
    assert b.sum() == 9 and b[3:, 3:].all() and not b[2, 2]
    assert not largest_blob(np.zeros((4, 4), bool)).any()


def test_module_constants_are_the_specified_palette():
    assert shapes.COLOURS == {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220),
                              "yellow": (240, 200, 30), "purple": (140, 60, 180), "orange": (245, 130, 30)}
    assert (shapes.MIN_SIZE, shapes.MAX_SIZE, shapes.IMAGE_SIZE) == (12, 24, 32)


# ------------------------------------------------------------------------------------------------ the new concept
def test_cross_coverage_matches_geometry():
    """A plus sign of bars size/3 wide: area = 2·(s·s/3) − (s/3)² = 5 s²/9; the bars' middle is full, corners empty."""
    for size in (12, 17, 24):
        cov = coverage("cross", size, 3, 5)
        assert cov.sum() == pytest.approx(5 * size ** 2 / 9, rel=0.03), size
        rows, cols = np.nonzero(cov)
        assert rows.min() >= 5 and rows.max() < 5 + size and cols.min() >= 3 and cols.max() < 3 + size
    cov = coverage("cross", 18, 0, 0, antialias=False)
    assert cov[9, 0] == 1 and cov[0, 9] == 1 and cov[17, 9] == 1 and cov[9, 17] == 1    # the four arm ends
    assert cov[:6, :6].sum() == 0 and cov[12:18, 12:18].sum() == 0                      # two corners: empty
    assert "cross" in shapes.CONCEPT_SHAPES and "cross" not in SHAPES


def test_make_concept_dataset_is_deterministic_with_right_captions(tmp_path):
    a = shapes.make_concept_dataset(tmp_path / "a", concept="cross", n=30, seed=3)
    b = shapes.make_concept_dataset(tmp_path / "b", concept="cross", n=30, seed=3)
    c = shapes.make_concept_dataset(tmp_path / "c", concept="cross", n=30, seed=4)
    ti = shapes.make_concept_dataset(tmp_path / "ti", concept="cross", n=30, seed=3, word="<cross>")
    meta = (a / "metadata.jsonl").read_text()
    assert meta == (b / "metadata.jsonl").read_text() and meta != (c / "metadata.jsonl").read_text()
    rows = [json.loads(line) for line in meta.splitlines()]
    images, captions = load_dataset(a)
    new = [r for r in rows if r["concept"]]
    old = [r for r in rows if not r["concept"]]
    assert len(new) == 15 and len(old) == 15                                    # replay = 0.5
    assert [r["colour"] for r in new] == ["red", "blue", "yellow", "purple", "orange"] * 3   # no green: held out
    for img, r, text in zip(images, rows, captions):
        assert text == r["text"] == f"a {r['colour']} {r['shape']}"
        assert (r["shape"] == "cross") == r["concept"]
        assert r["concept"] or (r["colour"], r["shape"]) in TRAIN_PAIRS
        assert np.array_equal(img, render_shape(r["colour"], r["shape"], r["size"], r["x"], r["y"]))
    ti_rows = [json.loads(line) for line in (ti / "metadata.jsonl").read_text().splitlines()]
    assert [r["text"] for r in ti_rows] == [f"a {r['colour']} <cross>" if r["concept"] else r["text"] for r in rows]
    assert np.array_equal(load_dataset(ti)[0], images)                          # same pictures, other word


def test_make_concept_dataset_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match=r"unknown concept 'hexagon'; choose from \('cross',\)"):
        shapes.make_concept_dataset(tmp_path, concept="hexagon")
    with pytest.raises(ValueError, match=r"replay must be in \[0, 1\), got 1"):
        shapes.make_concept_dataset(tmp_path, replay=1)
    with pytest.raises(ValueError, match=r"colours must be a non-empty list of .*, got \['pink'\]"):
        shapes.make_concept_dataset(tmp_path, colours=["pink"])


@pytest.mark.parametrize("antialias", [True, False])
def test_detector_recognises_the_cross_and_keeps_the_old_shapes(antialias):
    """Every colour × size 12..24 at random positions: a drawn cross is judged a cross, and no circle, square or
    triangle is ever taken for one (their crossness stays far below the threshold)."""
    from minidiff.shapes_eval import CROSS_ABOVE
    rng = np.random.default_rng(5 if antialias else 6)
    for colour in COLOURS:
        for size in range(12, 25):
            x, y = (int(v) for v in rng.integers(0, 33 - size, size=2))
            d = judge(render_shape(colour, "cross", size, x, y, antialias=antialias), colour, "cross")
            assert d["correct"] and d["crossness"] > 0.8, (colour, size, x, y, d)
            assert np.abs(np.subtract(d["bbox"], (y, x, y + size, x + size))).max() <= 1
            for shape in SHAPES:
                d = detect(render_shape(colour, shape, size, x, y, antialias=antialias))
                assert d["shape"] == shape and d["crossness"] < CROSS_ABOVE - 0.15, (colour, shape, size, d)
    assert not judge(render_shape("red", "cross", 20, 4, 4), "red", "triangle")["correct"]   # fill 5/9 < 0.64
    noisy = np.clip(render_shape("blue", "cross", 16, 8, 8) + rng.normal(0, 8, (32, 32, 3)), 0, 255).astype(np.uint8)
    assert judge(noisy, "blue", "cross")["correct"]


# ------------------------------------------------------------------------------------------------ the samples grid
def test_samples_grid_puts_each_prompt_on_a_row_and_each_seed_in_a_column():
    """evaluate's images are pair-major (every seed of a prompt, then the next prompt); the grid shows them enlarged
    (nearest) with the prompts as row labels and the seeds as column labels (compare.make_grid)."""
    import torch

    from minidiff.compare import grid_cell
    from minidiff.shapes_eval import samples_grid
    pairs, seeds = [("red", "circle"), ("blue", "square"), ("purple", "triangle")], [0, 5]
    specs = [{"colour": c, "shape": s, "size": 12 + 4 * k, "x": 2 * k, "y": 3}
             for c, s in pairs for k in range(len(seeds))]
    images = torch.from_numpy(np.stack([render_shape(**spec) for spec in specs])).permute(0, 3, 1, 2) / 255.0
    r = {"images": images, "per_pair": {caption(c, s): 0.5 for c, s in pairs},
         "settings": {"seeds": seeds, "n_images": len(specs)}}
    grid = samples_grid(r)
    g = grid.info["minidiff_grid"]
    assert (g["rows"], g["cols"], g["cell_w"], g["cell_h"]) == (3, 2, 64, 64)
    for i, spec in enumerate(specs):
        cell = grid_cell(grid, i // 2, i % 2)
        assert judge(cell, spec["colour"], spec["shape"])["correct"], spec     # the asked shape, where it belongs
        assert np.array_equal(np.asarray(cell)[::2, ::2], render_shape(**spec))  # exactly the image, twice as big
    assert (np.asarray(grid)[g["y0"]:, :g["x0"] - g["pad"]] < 128).any()       # the prompts written left of the rows


def test_a_stochastic_sampler_judges_the_same_images_on_every_call():
    """LCM draws noise between steps: evaluate() draws it from its own generators, not the global RNG, so the same
    call gives the same images (and numbers) whatever ran before it."""
    import torch

    import minidiff
    from minidiff.shapes_eval import evaluate
    pipe, kw = minidiff.load(), dict(pairs=[("red", "circle"), ("blue", "square")], seeds=range(2), steps=2,
                                     scheduler="lcm", guidance_scale=1.0)
    torch.manual_seed(0)
    first = evaluate(pipe, **kw)["images"]
    torch.manual_seed(1)
    assert torch.equal(evaluate(pipe, **kw)["images"], first)
# ------------------------------------------------------------------------------------------------ concept adherence
class Painter:
    """A stand-in for a model: draws, for each prompt "a {colour} {word}", the (colour, shape) that draw(colour, word)
    returns — a model whose behaviour the test knows."""

    def __init__(self, draw):
        from types import SimpleNamespace
        self.draw = draw
        self.unet = SimpleNamespace(config=SimpleNamespace(in_channels=4, sample_size=8))
        self.prompts = []

    def generate(self, prompts, latents=None, output="tensor", **kw):
        import torch
        assert output == "tensor" and len(latents) == len(prompts)
        self.prompts += prompts
        images = [render_shape(*self.draw(*p.split()[1:]), 16, 8, 8) for p in prompts]
        return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2) / 255.0      # [N, 3, 32, 32] in [0, 1]


def test_concept_adherence_counts_the_taught_the_held_out_and_the_old_prompts():
    from minidiff.data.shapes import CONCEPT_COLOURS
    from minidiff.shapes_eval import concept_adherence
    base = Painter(lambda colour, word: (colour, "square" if word == "cross" else word))   # never a cross
    r = concept_adherence(base, seeds=2)
    assert (r["concept"], r["held_out_colour"], r["original"], r["concept_shape"]) == (0.0, 0.0, 1.0, 0.0)
    assert sorted(set(base.prompts)) == sorted({caption(c, "cross") for c in (*CONCEPT_COLOURS, "green")}
                                               | {caption(*p) for p in TRAIN_PAIRS})
    assert len(base.prompts) == 2 * (len(CONCEPT_COLOURS) + 1 + len(TRAIN_PAIRS))      # seeds=2 is two seeds each
    # taught in five colours but not in green, and every old shape now drawn as a circle: 5 of 15 pairs still right
    tuned = Painter(lambda colour, word: (colour, "cross") if word == "cross" and colour != "green"
                    else (colour, "square") if word == "cross" else (colour, "circle"))
    r = concept_adherence(tuned, seeds=[7])
    assert (r["concept"], r["held_out_colour"], r["original"]) == (1.0, 0.0, pytest.approx(5 / 15))
    # a textual-inversion placeholder replaces the concept's word in its prompts only
    ti = Painter(lambda colour, word: (colour, "cross" if word == "<cross>" else word))
    r = concept_adherence(ti, seeds=1, words={"cross": "<cross>"})
    assert (r["concept"], r["held_out_colour"], r["original"]) == (1.0, 1.0, 1.0)
    assert {p.split()[-1] for p in ti.prompts} == {"<cross>", "circle", "square", "triangle"}
