"""minidiff.train.reports: the validation grid, matplotlib loss / LR plots, TensorBoard (--lora-text-encoder:
tests/test_lora.py)."""
import sys

import numpy as np
import pytest
from PIL import Image

from minidiff.compare import grid_cell
from minidiff.train import train
from minidiff.train.reports import render_validation
from tiny_runs import build_tiny_pipe, cfg_for


def test_validation_grid_holds_each_prompt_and_seed():
    """Rows = prompts, columns = seeds; each cell is pipe.generate(prompt, seed) with the validation settings,
    enlarged (nearest) from 16 to 128 px; the U-Net goes back to training mode afterwards."""
    pipe = build_tiny_pipe()
    pipe.unet.train()
    prompts, seeds = ["a red circle", "A horse"], (0, 3)
    grid = render_validation(pipe, prompts, seeds, 16, steps=2, guidance=5.0, scheduler="ddim")
    g = grid.info["minidiff_grid"]
    assert (g["rows"], g["cols"], g["cell_w"]) == (2, 2, 128)
    assert pipe.unet.training
    pipe.unet.eval()
    for r, prompt in enumerate(prompts):
        for c, seed in enumerate(seeds):
            want = pipe.generate(prompt, steps=2, guidance_scale=5.0, scheduler="ddim", seed=seed, height=16, width=16,
                                 progress=False)[0].resize((128, 128), Image.NEAREST)
            assert np.array_equal(np.asarray(grid_cell(grid, r, c)), np.asarray(want)), (prompt, seed)


def test_loss_and_lr_plots(tiny, tmp_path):
    out = tmp_path / "out"
    train(cfg_for(tiny, out, steps=3, warmup_steps=2, lr_schedule="linear"))
    for name in ("loss.png", "lr.png"):
        im = Image.open(out / name)
        assert im.size == (720, 360) and im.format == "PNG"
        assert len(set(im.convert("RGB").getdata())) > 10        # drawn: more than a blank canvas and one line


def test_report_to_tensorboard_without_tensorboard_is_a_clear_error(tiny, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)   # as if tensorboard were not installed
    with pytest.raises(RuntimeError, match="pip install tensorboard"):
        train(cfg_for(tiny, tmp_path / "out", steps=1, report_to="tensorboard"))


def test_report_to_tensorboard_writes_event_files(tiny, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out = tmp_path / "out"
    train(cfg_for(tiny, out, steps=2, checkpoint_every=1, report_to="tensorboard",
                  validation_prompts=["a red circle"], validation_steps=2))
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2]
    assert [e.step for e in acc.Images("validation")] == [1, 2]
