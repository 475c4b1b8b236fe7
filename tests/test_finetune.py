"""minidiff finetune on tiny random SD models: exact resume, NaN stop, what trains, the loss/schedule/EMA maths
against diffusers' training utilities, and an output folder that both minidiff and diffusers load."""
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import minidiff
from minidiff import finetune as ft
from minidiff.finetune import FinetuneConfig, TrainingDiverged, train


# ------------------------------------------------------------------------------------------------ tiny fixtures
def build_tiny_pipe(seed: int = 0, prediction_type: str | None = None):
    """SD v1's layout at toy width (tests/sd_fixtures' TINY_* configs), built with minidiff's classes (no diffusers
    import, so it is fast), weights jittered so nothing is a round constant."""
    from sd_fixtures import SD_SCHEDULER, TINY_TEXT, TINY_UNET, TINY_VAE

    from minidiff.clip import CLIPTextConfig, CLIPTextTransformer
    from minidiff.pipeline import StableDiffusion
    from minidiff.tokenizer import CLIPTokenizer
    from minidiff.unet import UNet, UNetConfig
    from minidiff.vae import AutoencoderKL, VAEConfig

    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        parts = [UNet(UNetConfig.from_diffusers(TINY_UNET)), AutoencoderKL(VAEConfig.from_diffusers(TINY_VAE)),
                 CLIPTextTransformer(CLIPTextConfig.from_transformers(TINY_TEXT))]
    with torch.no_grad():
        for m in parts:
            for p in m.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
            m.eval().requires_grad_(False)
    sched = dict(SD_SCHEDULER)
    if prediction_type:
        sched["prediction_type"] = prediction_type
    return StableDiffusion(tokenizer=CLIPTokenizer(), text_encoder=parts[2], unet=parts[0], vae=parts[1],
                           scheduler_config=sched)


def write_tiny_model(folder, seed: int = 0, prediction_type: str | None = None):
    minidiff.save(build_tiny_pipe(seed, prediction_type), folder)
    return folder


def write_tiny_dataset(folder, n: int = 6, seed: int = 0):
    """n small random images of uneven sizes (so crops matter) with captions."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (18 + 2 * i, 20, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "text": f"a picture of thing {i}"})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {"model": str(write_tiny_model(root / "model")), "data": str(write_tiny_dataset(root / "data")),
            "root": root}


def cfg_for(tiny, out, **kw):
    base = dict(model=tiny["model"], data=tiny["data"], output=str(out), steps=4, batch_size=2, lr=1e-3,
                resolution=16, checkpoint_every=100, validation_prompts=[], progress=False)
    return FinetuneConfig(**{**base, **kw})


def unet_weights(folder):
    return load_file(str(folder / "unet" / "diffusion_pytorch_model.safetensors"))


# Equivalence tests (accumulation, cached latents, DDP) compare runs whose gradients agree to float rounding. Some
# gradients are exactly zero in exact arithmetic (a bias just before a GroupNorm whose groups are single channels: the
# norm removes it), so both runs hold rounding noise there, ~1e-9, and Adam's g / (√v + ε) with ε = 1e-8 turns noise of
# either sign into a full ±lr step. ε = 1e-4 scales such steps down by 1e4 and leaves real gradients' steps as they are.
EQUIV = dict(adam_eps=1e-4)


def read_log(out):
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------------------------ the maths
def test_min_snr_weights_match_diffusers():
    """w(t) = min(SNR, γ)/SNR (ε) and min(SNR, γ)/(SNR + 1) (v), as diffusers' train_text_to_image.py computes them."""
    from diffusers import DDPMScheduler as DiffusersDDPM
    from diffusers.training_utils import compute_snr

    from minidiff.schedulers import DDPMScheduler
    cfg = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000}
    ours, theirs = DDPMScheduler.from_config(cfg), DiffusersDDPM.from_config(cfg)
    t = torch.tensor([0, 1, 10, 100, 250, 500, 750, 999])
    snr = compute_snr(theirs, t)
    gamma = 5.0
    capped = torch.stack([snr, gamma * torch.ones_like(t)], dim=1).min(dim=1)[0]
    torch.testing.assert_close(ft.snr(ours.alphas_cumprod, t), snr, rtol=1e-5, atol=0)
    torch.testing.assert_close(ft.min_snr_weights(ours.alphas_cumprod, t, gamma), capped / snr, rtol=1e-5, atol=0)
    torch.testing.assert_close(ft.min_snr_weights(ours.alphas_cumprod, t, gamma, "v_prediction"), capped / (snr + 1),
                               rtol=1e-5, atol=0)
    # and the weighted loss is the per-sample MSE times those weights, averaged
    pred, target = torch.randn(8, 4, 3, 3), torch.randn(8, 4, 3, 3)
    expected = (((pred - target) ** 2).mean(dim=(1, 2, 3)) * capped / snr).mean()
    torch.testing.assert_close(ft.diffusion_loss(pred, target, t, ours.alphas_cumprod, gamma), expected,
                               rtol=1e-5, atol=0)
    assert ft.diffusion_loss(pred, target, t, ours.alphas_cumprod) == torch.nn.functional.mse_loss(pred, target)


@pytest.mark.parametrize("schedule,theirs", [("constant", "constant_with_warmup"), ("cosine", "cosine"),
                                             ("linear", "linear")])
def test_lr_schedules_match_diffusers(schedule, theirs):
    from diffusers.optimization import get_scheduler
    total, warmup = 40, 7
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = get_scheduler(theirs, opt, num_warmup_steps=warmup, num_training_steps=total)
    expected = []
    for _ in range(total):
        expected.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    ours = [ft.lr_factor(s, schedule, warmup, total) for s in range(total)]
    np.testing.assert_allclose(ours, expected, rtol=1e-12, atol=1e-12)


def test_ema_matches_diffusers_emamodel():
    from diffusers.training_utils import EMAModel

    from minidiff.ema import EMA
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(7))]
    ours, theirs = EMA(params, decay=0.9), EMAModel(params, decay=0.9)
    for _ in range(30):
        with torch.no_grad():
            for p in params:
                p.add_(torch.randn_like(p))
        ours.update(params)
        theirs.step(params)
    for a, b in zip(ours.shadow.values(), theirs.shadow_params):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    trained = [p.detach().clone() for p in params]
    with ours.swapped_in(params):                       # validation renders with the average ...
        assert all(torch.equal(p, s) for p, s in zip(params, ours.shadow.values()))
    assert all(torch.equal(p, t) for p, t in zip(params, trained))   # ... and training goes on from its own weights
    state = ours.state_dict()
    again = EMA(params, decay=0.5)
    again.load_state_dict(state)
    assert again.num_updates == 30 and again.decay == 0.9


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_micro_step_targets(tiny, tmp_path, prediction_type):
    """The loss is the MSE against ε (or v = √ᾱ ε − √(1−ᾱ) z₀) of the sample's own z₀, ε and t: a model that
    returns exactly that target scores 0; each sample's randomness is a function of its stream position."""
    from minidiff.data.imagefolder import ImageFolderDataset
    pipe = build_tiny_pipe(0, prediction_type)
    cfg = cfg_for(tiny, tmp_path, noise_offset=0.1, caption_dropout=0.5)
    sched = pipe.make_scheduler("ddpm")
    stream = ft.SampleStream(ImageFolderDataset(tiny["data"], 16), cfg, 1000, (4, 8, 8))
    items = [stream[p] for p in (3, 4, 5)]
    assert torch.equal(stream[4]["noise"], items[1]["noise"]) and not torch.equal(items[0]["noise"], items[1]["noise"])
    batch = ft.collate(items)
    with torch.no_grad():
        z0 = pipe.vae.encode(batch["pixel_values"])
        z0 = (z0.mean + z0.std * batch["posterior_eps"]) * 0.18215
        eps = batch["noise"] + 0.1 * batch["offset"]
        a = sched.alphas_cumprod[batch["t"]].reshape(-1, 1, 1, 1)
        target = eps if prediction_type == "epsilon" else a.sqrt() * eps - (1 - a).sqrt() * z0
        zt = a.sqrt() * z0 + (1 - a).sqrt() * eps
    seen = {}

    def oracle(x, t, context):
        seen["x"], seen["context"] = x, context
        return target

    loss = ft.micro_step_loss(batch, pipe, oracle, sched, sched.alphas_cumprod, prediction_type, cfg, torch.device("cpu"),
                          lambda: torch.autocast("cpu", enabled=False))
    assert float(loss) < 1e-10
    torch.testing.assert_close(seen["x"], zt, rtol=1e-5, atol=1e-5)
    # a dropped caption is the empty prompt's encoding
    empty = pipe.text_encoder(pipe.tokenizer([""]))[0]
    for i, text in enumerate(batch["text"]):
        assert torch.equal(seen["context"][i], empty) == (text == "")


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
    assert [p.name for p in ft.list_checkpoints(b)] == ["step-000003"]
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
    assert [p.name for p in ft.list_checkpoints(a)] == ["step-000006"]       # keep_last=1 pruned step 3
    for r in la:
        assert {"step", "loss", "lr", "samples_per_s", "grad_norm", "epoch"} <= r.keys()
    assert la[0]["lr"] == 0.0 and la[1]["lr"] == pytest.approx(0.5e-3)          # linear warm-up over 2 steps


def test_output_loads_in_minidiff_and_diffusers(tiny, tmp_path):
    """OUT is a diffusers folder (diffusers' StableDiffusionPipeline loads it, extra files and all) holding the
    trained U-Net; the frozen VAE and text encoder are written unchanged; --export-compvis writes the same weights."""
    from diffusers import StableDiffusionPipeline
    out = tmp_path / "out"
    train(cfg_for(tiny, out, steps=2, export_compvis=True, checkpoint_every=2, validation_prompts=["a red circle"],
                  validation_seeds=(0, 1), validation_steps=2))
    base, ours, compvis = minidiff.load(tiny["model"]), minidiff.load(out), minidiff.load(out / "model.safetensors")
    trained = load_file(str(out / "checkpoints" / "step-000002" / "trainable.safetensors"))
    assert trained.keys() == ours.unet.state_dict().keys()
    for k, v in ours.unet.state_dict().items():
        assert torch.equal(v, trained[k]) and torch.equal(v, compvis.unet.state_dict()[k])
    assert any(not torch.equal(v, base.unet.state_dict()[k]) for k, v in ours.unet.state_dict().items())
    for part in ("vae", "text_encoder"):
        for k, v in getattr(ours, part).state_dict().items():
            assert torch.equal(v, getattr(base, part).state_dict()[k]), (part, k)

    dpipe = StableDiffusionPipeline.from_pretrained(str(out), safety_checker=None)
    theirs = dpipe.unet.state_dict()
    for k, v in ours.unet.state_dict().items():
        assert torch.equal(theirs[k], v), k
    # the PNGs: a validation grid at the checkpoint, and the loss curve
    grid = Image.open(out / "validation" / "step-000002.png")
    assert grid.size[0] > 2 * 128 and grid.size[1] > 128
    assert Image.open(out / "loss.png").size == (720, 360)
    assert json.loads((out / "finetune_config.json").read_text())["steps"] == 2


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
    assert [p.name for p in ft.list_checkpoints(out)] == ["step-000002", "step-000004"]
    good = load_file(str(out / "checkpoints" / "step-000004" / "trainable.safetensors"))
    assert all(torch.isfinite(v).all() for v in good.values())
    assert [r["step"] for r in read_log(out)] == [1, 2, 3, 4]
    assert not (out / "model_index.json").exists()

    # the command line says the same and exits with 1
    from minidiff.cli import main
    calls["n"] = 0
    code = main(["finetune", "--model", tiny["model"], "--data", tiny["data"], "--output", str(tmp_path / "cli"),
                 "--steps", "6", "--batch-size", "2", "--resolution", "16", "--validation-steps", "0",
                 "--no-progress"])
    assert code == 1
    assert "training diverged at step 5" in capsys.readouterr().err


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


def test_last_up_blocks_trains_only_those(tiny, tmp_path):
    out = tmp_path / "out"
    train(cfg_for(tiny, out, steps=2, train="last-up-blocks", up_blocks=1))
    before, after = minidiff.load(tiny["model"]).unet.state_dict(), minidiff.load(out).unet.state_dict()
    n_up = max(int(k.split(".")[1]) for k in before if k.startswith("up_blocks.")) + 1
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith(f"up_blocks.{n_up - 1}.") for k in changed)
    trained = load_file(str(out / "checkpoints" / "step-000002" / "trainable.safetensors"))
    assert all(k.startswith(f"up_blocks.{n_up - 1}.") for k in trained)
    with pytest.raises(ValueError, match="--up-blocks"):
        train(cfg_for(tiny, tmp_path / "bad", steps=1, train="last-up-blocks", up_blocks=9))


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
    preset = ft.PRESETS["pokemon"]
    assert cfg.lr == 2e-5 and cfg.ema is False and cfg.max_grad_norm is None and cfg.validation_seeds == (3, 4)
    assert (cfg.resolution, cfg.batch_size, cfg.grad_accum, cfg.steps) == (512, preset["batch_size"],
                                                                           preset["grad_accum"], 15000)
    assert cfg.mixed_precision == "bf16" and cfg.gradient_checkpointing and cfg.cache_latents
    plain = cli.config_from_args(p.parse_args(["--data", "d", "--output", "o", "--random-crop", "--train", "lora"]))
    assert plain.center_crop is False and plain.train == "lora" and plain.lr == FinetuneConfig.lr
    assert FinetuneConfig.from_preset("pokemon", data="d", output="o", steps=10).steps == 10
