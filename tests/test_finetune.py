"""minidiff finetune (minidiff.train.train) end to end on tiny random SD models: exact resume, the NaN stop,
accumulation and cached latents equal to the plain run, mixed precision, refusals, the CLI's presets. The tiny
world they run in: tests/tiny_runs.py. Each train module's own tests: tests/test_train_<module>.py."""
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import minidiff
from minidiff.train import PRESETS, FinetuneConfig, TrainingDiverged, train
from minidiff.train.state import list_checkpoints
from tiny_runs import EQUIV, cfg_for, read_log, unet_weights


# ------------------------------------------------------------------------------------------------ runs
def test_resume_gives_the_same_weights(tiny, tmp_path):
    """Steps 6, checkpoint every 3. Run A goes straight through; run B is stopped after step 4 (as by a kill, one
    step past its checkpoint), then resumed. Every stochastic option is on. Same weights, EMA and log at the end."""
    kw = dict(steps=6, checkpoint_every=3, keep_last=1, ema=True, ema_decay=0.9, random_flip=True,
              center_crop=False, caption_dropout=0.3, min_snr_gamma=5.0, noise_offset=0.05, warmup_steps=2,
              lr_schedule="cosine", grad_accum=2)
    a, b = tmp_path / "a", tmp_path / "b"
    train(cfg_for(tiny, a, **kw))
    first = train(cfg_for(tiny, b, max_steps_this_run=4, **kw))
    assert first == {"step": 4, "finished": False, "output": str(b), "loss": first["loss"]}
    assert not (b / "model_index.json").exists() and len(read_log(b)) == 4
    assert [p.name for p in list_checkpoints(b)] == ["step-000003"]
    second = train(cfg_for(tiny, b, resume=True, **kw))
    assert second["finished"] and second["step"] == 6

    wa, wb = unet_weights(a), unet_weights(b)
    assert wa.keys() == wb.keys()
    worst = max(float((wa[k] - wb[k]).abs().max()) for k in wa)
    assert worst <= 1e-6, worst
    ea, eb = (load_file(str(x / "checkpoints" / "step-000006" / "ema.safetensors")) for x in (a, b))
    assert max(float((ea[k] - eb[k]).abs().max()) for k in ea) <= 1e-6
    la, lb = read_log(a), read_log(b)
    assert [r["step"] for r in lb] == [1, 2, 3, 4, 5, 6]
    np.testing.assert_allclose([r["loss"] for r in la], [r["loss"] for r in lb], rtol=1e-6)
    np.testing.assert_allclose([r["lr"] for r in la], [r["lr"] for r in lb], rtol=0)
    assert [p.name for p in list_checkpoints(a)] == ["step-000006"]       # keep_last=1 pruned step 3
    for r in la:
        assert {"step", "loss", "lr", "samples_per_s", "grad_norm", "epoch"} <= r.keys()
    assert la[0]["lr"] == 0.0 and la[1]["lr"] == pytest.approx(0.5e-3)          # linear warm-up over 2 steps


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tiny, tmp_path, monkeypatch, capsys):
    calls = {"n": 0}
    from minidiff.train import objective
    real = objective.diffusion_loss

    def poisoned(*args, **kw):
        calls["n"] += 1
        loss = real(*args, **kw)
        return loss * float("nan") if calls["n"] == 5 else loss   # the 5th micro-step = step 5

    monkeypatch.setattr(objective, "diffusion_loss", poisoned)
    out = tmp_path / "out"
    with pytest.raises(TrainingDiverged, match=r"step 5: the loss is nan") as e:
        train(cfg_for(tiny, out, steps=6, checkpoint_every=2, keep_last=5))
    assert "step-000004" in str(e.value)
    assert [p.name for p in list_checkpoints(out)] == ["step-000002", "step-000004"]
    good = load_file(str(out / "checkpoints" / "step-000004" / "trainable.safetensors"))
    assert all(torch.isfinite(v).all() for v in good.values())
    assert [r["step"] for r in read_log(out)] == [1, 2, 3, 4]
    assert not (out / "model_index.json").exists()

    # the command line says the same in one line, and exits with 2
    from minidiff.cli import main
    calls["n"] = 0
    code = main(["finetune", "--model", tiny["model"], "--data", tiny["data"], "--output", str(tmp_path / "cli"),
                 "--steps", "6", "--batch-size", "2", "--resolution", "16", "--no-progress"])
    assert code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("minidiff finetune: error: step 5: the loss is nan") and "Last good checkpoint:" in last


def test_grad_accumulation_equals_the_bigger_batch(tiny, tmp_path):
    """batch 4 x 1 micro-step and batch 2 x 2 micro-steps see the same samples and the same gradient."""
    train(cfg_for(tiny, tmp_path / "big", steps=2, batch_size=4, grad_accum=1, **EQUIV))
    train(cfg_for(tiny, tmp_path / "acc", steps=2, batch_size=2, grad_accum=2, **EQUIV))
    wa, wb = unet_weights(tmp_path / "big"), unet_weights(tmp_path / "acc")
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) <= 1e-5


def test_cached_latents_give_the_same_run(tiny, tmp_path):
    """Cached posterior moments (both flips) are sampled with the same noise as an uncached step would be."""
    kw = dict(steps=2, random_flip=True, batch_size=3, **EQUIV)
    train(cfg_for(tiny, tmp_path / "plain", **kw))
    train(cfg_for(tiny, tmp_path / "cached", cache_latents=True, **kw))
    wa, wb = unet_weights(tmp_path / "plain"), unet_weights(tmp_path / "cached")
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) <= 1e-5
    la, lb = read_log(tmp_path / "plain"), read_log(tmp_path / "cached")
    np.testing.assert_allclose([r["loss"] for r in la], [r["loss"] for r in lb], rtol=1e-4)
    with pytest.raises(ValueError, match="center_crop"):
        cfg_for(tiny, tmp_path / "x", cache_latents=True, center_crop=False)


def test_mixed_precision_runs_on_cpu(tiny, tmp_path):
    for mp in ("bf16", "fp16"):
        out = tmp_path / mp
        r = train(cfg_for(tiny, out, steps=2, mixed_precision=mp, gradient_checkpointing=True))
        assert r["finished"] and math.isfinite(r["loss"])
        assert minidiff.load(out).unet.conv_in.weight.dtype == torch.float32
    assert "loss_scale" in read_log(tmp_path / "fp16")[0]


def test_refusals(tiny, tmp_path):
    out = tmp_path / "out"
    train(cfg_for(tiny, out, steps=1))
    with pytest.raises(FileExistsError, match="--resume"):
        train(cfg_for(tiny, out, steps=2))
    with pytest.raises(RuntimeError, match="CUDA"):
        train(cfg_for(tiny, tmp_path / "8bit", steps=1, optimizer="adamw8bit"))
    with pytest.raises(ValueError, match="train must be"):
        cfg_for(tiny, out, train="everything")


def test_cli_preset_and_overrides(tiny):
    import argparse

    from minidiff.commands import finetune as cli
    p = argparse.ArgumentParser()
    cli.add_arguments(p)
    cfg = cli.config_from_args(p.parse_args(["--preset", "pokemon", "--data", "d", "--output", "o", "--lr", "2e-5",
                                            "--no-ema", "--max-grad-norm", "0", "--validation-seeds", "3,4"]))
    preset = PRESETS["pokemon"]
    assert cfg.lr == 2e-5 and cfg.ema is False and cfg.max_grad_norm is None and cfg.validation_seeds == (3, 4)
    assert (cfg.resolution, cfg.batch_size, cfg.grad_accum, cfg.steps) == (512, preset["batch_size"],
                                                                           preset["grad_accum"], 15000)
    assert cfg.mixed_precision == "bf16" and cfg.gradient_checkpointing and cfg.cache_latents
    plain = cli.config_from_args(p.parse_args(["--data", "d", "--output", "o", "--random-crop", "--train", "lora"]))
    assert plain.center_crop is False and plain.train == "lora" and plain.lr == FinetuneConfig.lr
    assert FinetuneConfig.from_preset("pokemon", data="d", output="o", steps=10).steps == 10
