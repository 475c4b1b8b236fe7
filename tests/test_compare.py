"""The comparison grid: layout and labels of make_grid, and `minidiff compare` on two tiny models — each cell is
exactly pipe.generate(prompt, seed) of its model, the same seed side by side."""
import numpy as np
import pytest
from PIL import Image

import minidiff
from minidiff.compare import DEFAULT_PROMPTS, compare, grid_cell, make_grid, read_prompts
from tiny_runs import write_tiny_model

MONOGRAPH = ["A toucan", "A capybara", "A horse", "A Pokémon calculator", "A Pokémon cellphone", "A humanoid car",
             "A water type fridge", "A eletric type fridge", "A fire type fridge", "A grass type fridge",
             "A mix of Pikachu and Rayquaza", "A mix of Feraligatr and MewTwo", "A pokémon band", "A pokémon writing",
             "A rainbow colored Bulbassaur"]


def _solid(colour, size=16):
    return Image.new("RGB", (size, size), colour)


def test_default_prompts_are_the_monographs():
    assert read_prompts() == MONOGRAPH
    assert DEFAULT_PROMPTS.read_text(encoding="utf-8") == "".join(p + "\n" for p in MONOGRAPH)


def test_read_prompts_skips_blanks_and_comments(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("# mine\nA toucan\n\n  A horse  \n", encoding="utf-8")
    assert read_prompts(f) == ["A toucan", "A horse"]
    f.write_text("\n# nothing\n")
    with pytest.raises(ValueError, match="no prompts"):
        read_prompts(f)


def test_grid_layout_and_labels():
    colours = [[(255, 0, 0), (0, 255, 0), (0, 0, 255)], [(9, 9, 9), (200, 100, 0), (0, 100, 200)]]
    images = [[_solid(c) for c in row] for row in colours]
    grid = make_grid(images, ["first row", "second"], ["a", "b", "c"], cell=64, pad=4)
    g = grid.info["minidiff_grid"]
    assert (g["rows"], g["cols"], g["cell_w"], g["cell_h"]) == (2, 3, 64, 64)
    assert grid.size == (g["x0"] + 3 * (64 + 4), g["y0"] + 2 * (64 + 4))
    for r, row in enumerate(colours):
        for c, colour in enumerate(row):
            cell = np.asarray(grid_cell(grid, r, c))
            assert (cell == np.array(colour, np.uint8)).all()          # enlarged 16 -> 64 px, nearest: exact
    a = np.asarray(grid)
    assert (a[g["y0"]:, : g["x0"] - 4] < 128).any()                     # row labels left of the cells
    assert (a[: g["y0"] - 4, g["x0"]:] < 128).any()                     # column labels above them
    assert g["x0"] >= 64 and g["y0"] > 4
    # a flat row-major list gives the same picture; no labels = no label margins
    flat = make_grid([im for row in images for im in row], ["first row", "second"], ["a", "b", "c"], cell=64, pad=4)
    assert np.array_equal(np.asarray(flat), a)
    bare = make_grid(images, pad=0)
    assert bare.size == (3 * 16, 2 * 16)
    with pytest.raises(ValueError, match="row labels"):
        make_grid(images, ["only one"], ["a", "b", "c"])


def test_compare_cells_are_each_models_own_images(tmp_path):
    base_dir, tuned_dir = write_tiny_model(tmp_path / "base", seed=0), write_tiny_model(tmp_path / "tuned", seed=1)
    prompts, seeds = ["A toucan", "A pokémon band"], [0, 3]
    kw = dict(steps=2, guidance=5.0, scheduler="ddim")
    grid = compare(str(base_dir), str(tuned_dir), prompts, seeds, progress=False, **kw)
    g = grid.info["minidiff_grid"]
    assert (g["rows"], g["cols"]) == (2, 4)
    side = g["cell_w"]                               # 16 px images enlarged x8 -> 128 px
    pipes = {0: minidiff.load(base_dir), 1: minidiff.load(tuned_dir)}
    for r, prompt in enumerate(prompts):
        for j, seed in enumerate(seeds):
            for k in (0, 1):                         # columns: base seed 0, tuned seed 0, base seed 3, tuned seed 3
                expected = pipes[k].generate(prompt, steps=2, guidance_scale=5.0, scheduler="ddim", seed=seed,
                                             progress=False)[0].resize((side, side), Image.NEAREST)
                assert np.array_equal(np.asarray(grid_cell(grid, r, 2 * j + k)), np.asarray(expected))
    assert not np.array_equal(np.asarray(grid_cell(grid, 0, 0)), np.asarray(grid_cell(grid, 0, 1)))


def test_compare_takes_loaded_models(tmp_path):
    """The docstring's promise: base and tuned may be loaded StableDiffusion objects (notebook 13 passes them); the
    door checks paths only where a path is given, and a loaded model's cells are its own images."""
    base_dir, tuned_dir = write_tiny_model(tmp_path / "base", seed=0), write_tiny_model(tmp_path / "tuned", seed=1)
    base, tuned = minidiff.load(base_dir), minidiff.load(tuned_dir)
    kw = dict(steps=2, guidance=5.0, scheduler="ddim", progress=False)
    from_objects = compare(base, tuned, ["A toucan"], [0], **kw)
    from_paths = compare(str(base_dir), str(tuned_dir), ["A toucan"], [0], **kw)
    mixed = compare(base, str(tuned_dir), ["A toucan"], [0], **kw)
    assert np.array_equal(np.asarray(from_objects), np.asarray(from_paths))
    assert np.array_equal(np.asarray(mixed), np.asarray(from_paths))
    with pytest.raises(ValueError, match="tuned"):                 # a bad path beside a loaded model still fails
        compare(base, str(tmp_path / "missing"), ["A toucan"], [0], **kw)
    with pytest.raises(TypeError, match="base"):                   # neither a path nor a model
        compare(3.5, tuned, ["A toucan"], [0], **kw)


def test_cli_writes_the_grid(tmp_path):
    from minidiff.cli import main
    base_dir, tuned_dir = write_tiny_model(tmp_path / "base", seed=0), write_tiny_model(tmp_path / "tuned", seed=1)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("A horse\nA capybara\nA humanoid car\n", encoding="utf-8")
    out = tmp_path / "grid.png"
    assert main(["compare", "--base", str(base_dir), "--tuned", str(tuned_dir), "--prompts", str(prompts),
                 "--seeds", "0,1,2", "--steps", "1", "--out", str(out), "--cell", "32"]) == 0
    im = Image.open(out)
    cols, rows = 6, 3
    assert im.size[0] > cols * 32 and im.size[1] > rows * 32
