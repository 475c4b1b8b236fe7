"""minidiff.train's reports: matplotlib loss / LR plots, TensorBoard (--lora-text-encoder: tests/test_lora.py)."""
import sys

import pytest
from PIL import Image

from minidiff.train import train
from test_finetune import cfg_for, tiny  # noqa: F401  (tiny is a fixture)


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
