"""minidiff.train's other options: LoRA on the text encoder too, and the reports (matplotlib plots, TensorBoard)."""
import importlib.util

import pytest
import torch
from PIL import Image

import minidiff
from minidiff.lora import read_lora
from minidiff.train import train
from test_finetune import cfg_for, tiny  # noqa: F401  (tiny is a fixture)


def test_lora_on_the_text_encoder_too(tiny, tmp_path):
    out = tmp_path / "out"
    train(cfg_for(tiny, out, steps=2, train="lora", lora_rank=2, lora_alpha=4, lora_text_encoder=True,
                  lora_export="separate", lr=1e-2, validation_prompts=None))       # default validation: on
    base, tuned = minidiff.load(tiny["model"]), minidiff.load(out)
    changed = {part: {k for k, v in getattr(tuned, part).state_dict().items()
                      if not torch.equal(v, getattr(base, part).state_dict()[k])}
               for part in ("unet", "vae", "text_encoder")}
    assert not changed["vae"] and changed["unet"]
    assert changed["text_encoder"] and all(k.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight",
                                                         "out_proj.weight")) for k in changed["text_encoder"])
    # the separate file: merged = W0 + (alpha / r) B A, key by key
    tensors, meta = read_lora(out / "lora_text_encoder.safetensors")
    assert meta["rank"] == 2 and meta["alpha"] == 4.0
    te_base, te_tuned = base.text_encoder.state_dict(), tuned.text_encoder.state_dict()
    for key in changed["text_encoder"]:
        module = key[: -len(".weight")]
        A, B = tensors[f"text_encoder.{module}.lora_A.weight"], tensors[f"text_encoder.{module}.lora_B.weight"]
        torch.testing.assert_close(te_tuned[key], te_base[key] + 2.0 * B @ A, rtol=0, atol=1e-6)
    assert (out / "lora.safetensors").is_file()
    with pytest.raises(ValueError, match="lora_text_encoder needs train='lora'"):
        cfg_for(tiny, out, lora_text_encoder=True)


def test_loss_and_lr_plots(tiny, tmp_path):
    out = tmp_path / "out"
    train(cfg_for(tiny, out, steps=3, warmup_steps=2, lr_schedule="linear"))
    for name in ("loss.png", "lr.png"):
        im = Image.open(out / name)
        assert im.size == (720, 360) and im.format == "PNG"
        assert len(set(im.convert("RGB").getdata())) > 10        # drawn: more than a blank canvas and one line


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is not None, reason="tensorboard is installed")
def test_report_to_tensorboard_without_tensorboard_is_a_clear_error(tiny, tmp_path):
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
