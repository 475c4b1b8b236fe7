"""--train lcm-lora (minidiff/train/consistency.py): latent consistency distillation into a LoRA.

The loss of one fixed batch recomputed by hand from the papers' equations (the teacher a separate copy of the base
U-Net, the target a copy holding θ⁻, ᾱ from the β formula, c_skip / c_out written out); the teacher switch; a run
through the one train_step; exact resume; the export sampling with scheduler="lcm"; the committed distilled LoRA of the
embedded model in minidiff and in diffusers; the refusals of bad flags."""
import copy
import json
import math
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import minidiff
from minidiff.lora import apply_lora, inject_lora, lora_layers
from minidiff.train import loop, train
from minidiff.train.consistency import lcm_micro_step_loss, lcm_scheduler, teacher
from minidiff.train.trainable import LCM_LORA_TARGETS
from tiny_runs import build_tiny_pipe, cfg_for, read_log

ROOT = Path(__file__).resolve().parent.parent
COMMITTED = ROOT / "weights" / "minidiff-shapes-lcm-lora"


def lcm_cfg(tiny, out, **kw):
    return cfg_for(tiny, out, **{"train": "lcm-lora", "lora_rank": 2, "lr": 1e-2, "caption_dropout": 0.0, **kw})


def _student(seed=0):
    """The tiny SD model with LoRA where LCM-LoRA puts it, A and B random (as after some training)."""
    pipe = build_tiny_pipe(seed)
    layers = inject_lora(pipe.unet, rank=2, alpha=2, targets=LCM_LORA_TARGETS)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in layers.values():
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.1)
    return pipe


# ------------------------------------------------------------------------------------------------ the loss by hand
def _batch(B=3):
    g = torch.Generator().manual_seed(5)
    return {"pixel_values": torch.rand(B, 3, 16, 16, generator=g) * 2 - 1, "text": ["a cat", "a dog", "a toucan"][:B],
            "posterior_eps": torch.randn(B, 4, 8, 8, generator=g), "noise": torch.randn(B, 4, 8, 8, generator=g),
            "t": torch.tensor([3, 500, 999])[:B],         # -> grid points 19 (whose step lands on t = 0), 519, 999
            "guidance_u": torch.tensor([0.0, 0.5, 0.9])[:B]}


@pytest.mark.parametrize("loss", ["huber", "l2"])
def test_the_loss_of_one_batch_by_hand(loss):
    pipe = _student()
    ema = {n: (p + 0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(7))).detach()
           for n, p in pipe.unet.named_parameters() if p.requires_grad}               # θ⁻: a distinct set of A, B
    batch, k, (s_lo, s_hi), c = _batch(), 20, (2.0, 6.0), 1e-3
    ours, logs = lcm_micro_step_loss(batch, pipe, pipe.unet, lcm_scheduler(pipe.scheduler_config, k), ema, "cpu",
                                     nullcontext, k, (s_lo, s_hi), loss, c)

    # the paper's equations, step by step, with models built independently of the LoRA scale switch
    base = build_tiny_pipe(0).unet                               # the teacher: the base U-Net, another copy
    target_net = copy.deepcopy(pipe.unet)                        # the target network: the student's layers, θ⁻ loaded
    with torch.no_grad():
        for n, p in target_net.named_parameters():
            if n in ema:
                p.copy_(ema[n])
    cfg = pipe.scheduler_config
    betas = torch.linspace(cfg["beta_start"] ** 0.5, cfg["beta_end"] ** 0.5, 1000, dtype=torch.float64) ** 2
    abar = torch.cumprod(1 - betas, 0).float()                  # ᾱ_t
    with torch.no_grad():
        post = pipe.vae.encode(batch["pixel_values"])
        z0 = (post.mean + post.std * batch["posterior_eps"]) * pipe.latent_scale
        t_start = torch.tensor([19, 519, 999])                   # t_{n+k}: t moved up to the grid k·m − 1
        t_end = torch.tensor([0, 499, 979])                      # t_n = t_{n+k} − k, clamped at 0
        a, a_end = abar[t_start].view(-1, 1, 1, 1), abar[t_end].view(-1, 1, 1, 1)
        z = a.sqrt() * z0 + (1 - a).sqrt() * batch["noise"]
        cond = pipe.text_encoder(pipe.tokenizer(batch["text"]))
        uncond = pipe.text_encoder(pipe.tokenizer([""] * 3))
        s = torch.tensor([s_lo, s_lo + 0.5 * (s_hi - s_lo), s_lo + 0.9 * (s_hi - s_lo)]).view(-1, 1, 1, 1)
        eps_u, eps_c = base(z, t_start, uncond), base(z, t_start, cond)
        eps = eps_u + s * (eps_c - eps_u)                        # classifier-free guidance
        x0 = (z - (1 - a).sqrt() * eps) / a.sqrt()
        z_end = a_end.sqrt() * x0 + (1 - a_end).sqrt() * eps     # one DDIM step (η = 0)

        def f(out, zt, t, ab):                                   # the consistency function, LCM eq. 6
            st = 10.0 * t.float().view(-1, 1, 1, 1)
            c_skip, c_out = 0.25 / (st ** 2 + 0.25), st / (st ** 2 + 0.25).sqrt()
            return c_skip * zt + c_out * (zt - (1 - ab).sqrt() * out) / ab.sqrt()

        target = f(target_net(z_end, t_end, cond), z_end, t_end, a_end)
        pred = f(pipe.unet(z, t_start, cond), z, t_start, a)
    assert torch.equal(target[0], z_end[0])                      # the boundary condition: f(z, 0) = z
    d = pred - target
    hand = (torch.sqrt(d ** 2 + c ** 2) - c).mean() if loss == "huber" else (d ** 2).mean()
    # fp32 through two U-Net passes and the text encoder: relative rounding ~1e-6; 1e-5 leaves room for batching
    torch.testing.assert_close(ours.detach(), hand, rtol=1e-5, atol=0)
    assert logs["guidance"].item() == pytest.approx(float(s.mean()))
    ours.backward()                                              # only the student's pass carries a gradient
    assert all(m.lora_B.weight.grad is not None for m in lora_layers(pipe.unet).values())


def test_the_teacher_is_the_base_model():
    pipe = _student()
    base = build_tiny_pipe(0).unet
    g = torch.Generator().manual_seed(2)
    z, t, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 700]), torch.randn(2, 77, 64, generator=g)
    with torch.no_grad():
        student = pipe.unet(z, t, ctx)
        with teacher(pipe.unet):
            inside = pipe.unet(z, t, ctx)
        after = pipe.unet(z, t, ctx)
        expected = base(z, t, ctx)
    # the same function; the wrapped layers add their residual after the kernel instead of inside it: fp32 rounding
    torch.testing.assert_close(inside, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(after, student) and (student - expected).abs().max() > 1e-2


# ------------------------------------------------------------------------------------------------ the run
def test_lcm_lora_trains_through_train_step_and_exports_an_lcm_lora(tiny, tmp_path, monkeypatch):
    real, calls = loop.train_step, []

    def counting(*args, **kw):
        calls.append(kw["ema"])                                  # the target network rides in train_step's EMA slot
        return real(*args, **kw)

    monkeypatch.setattr(loop, "train_step", counting)
    out = tmp_path / "out"
    r = train(lcm_cfg(tiny, out, steps=2, batch_size=1))
    assert r["finished"] and math.isfinite(r["loss"]) and len(calls) == 2
    assert calls[-1].decay == 0.95 and calls[-1].num_updates == 2

    lora = load_file(str(out / "lora.safetensors"))              # written whatever --lora-export says
    ema = load_file(str(out / "checkpoints" / "step-000002" / "ema.safetensors"))
    assert len(lora) == len(ema)                                  # θ⁻ is what is exported: every A and B of it
    kinds = {t for t in LCM_LORA_TARGETS if any(f".{t}." in k for k in lora)}
    assert kinds == set(LCM_LORA_TARGETS)
    sched = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert sched["_class_name"] == "LCMScheduler" and sched["original_inference_steps"] == 50

    # the merged folder samples with LCM by itself, as the base model does with the LoRA file and scheduler="lcm"
    kw = dict(steps=2, guidance_scale=1.0, seed=1, output="tensor", progress=False)
    merged = minidiff.load(out).generate("a picture of thing 1", **kw)
    applied = apply_lora(minidiff.load(tiny["model"]), out / "lora.safetensors").generate(
        "a picture of thing 1", scheduler="lcm", **kw)
    torch.testing.assert_close(merged, applied, rtol=1e-4, atol=1e-4)   # merged weights vs the detour: rounding
    base = minidiff.load(tiny["model"]).generate("a picture of thing 1", scheduler="lcm", **kw)
    assert (base - applied).abs().max() > 1e-3                          # the LoRA changed the picture


def test_resume_is_bit_exact(tiny, tmp_path):
    """Run B stops at its step-2 checkpoint (as a kill right after writing it) and resumes; run A goes straight to
    step 3. Same LoRA, target network and losses, bit for bit (tests/test_finetune_kill.py kills the other modes)."""
    kw = dict(steps=3, checkpoint_every=2, keep_last=1, batch_size=1, grad_accum=2, lcm_guidance_min=2.0,
              lcm_guidance_max=8.0, lcm_ema_decay=0.5)
    a, b = tmp_path / "a", tmp_path / "b"
    train(lcm_cfg(tiny, a, **kw))
    assert not train(lcm_cfg(tiny, b, max_steps_this_run=2, **kw))["finished"]
    assert train(lcm_cfg(tiny, b, resume=True, **kw))["finished"]
    for name in ("lora.safetensors", "checkpoints/step-000003/ema.safetensors",
                 "checkpoints/step-000003/trainable.safetensors"):
        wa, wb = load_file(str(a / name)), load_file(str(b / name))
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), name
    assert [r["loss"] for r in read_log(a)] == [r["loss"] for r in read_log(b)]


def test_bad_flags_are_refused(tiny, tmp_path):
    """The door (FINETUNE_FIELDS, FINETUNE_RULES): each message names the setting, its flag and the value."""
    for kw, message in [(dict(lcm_guidance_min=8.0, lcm_guidance_max=4.0),
                         r"lcm_guidance_min \(--lcm-guidance-min\) must be <= lcm_guidance_max \(--lcm-guidance-max\), "
                         r"got 8.0 and 4.0"),
                        (dict(lcm_guidance_min=0.5), r"lcm_guidance_min must be a finite number >= 1, got 0.5"),
                        (dict(lcm_loss="l1"), r"lcm_loss must be one of 'huber', 'l2', got 'l1' \(--lcm-loss\)"),
                        (dict(lcm_huber_c=0.0), r"lcm_huber_c must be a finite number > 0, got 0.0"),
                        (dict(lcm_ema_decay=1.0), r"lcm_ema_decay must be a finite number in \[0, 1\), got 1.0"),
                        (dict(lcm_skip=0), r"lcm_skip must be an int >= 1, got 0 \(--lcm-skip\)"),
                        (dict(ema=True), r"ema \(--ema\) is not for --train lcm-lora: its EMA is the target network"),
                        (dict(min_snr_gamma=5.0), r"min_snr_gamma \(--min-snr-gamma\) tweaks the denoising loss"),
                        (dict(noise_offset=0.1), r"noise_offset \(--noise-offset\) tweaks the denoising loss")]:
        with pytest.raises(ValueError, match=message):
            lcm_cfg(tiny, tmp_path / "x", **kw)
    with pytest.raises(ValueError, match=r"lcm_skip must divide the model's 1000 training timesteps .* got 30 "
                                         r"\(--lcm-skip\)"):
        train(lcm_cfg(tiny, tmp_path / "skip", lcm_skip=30))
    assert not (tmp_path / "skip").exists()                   # refused before the output folder was made

    import argparse
    from minidiff.commands import finetune as cli
    p = argparse.ArgumentParser()
    cli.add_arguments(p)
    cfg = cli.config_from_args(p.parse_args(["--data", "d", "--output", "o", "--train", "lcm-lora", "--lcm-skip",
                                             "50", "--lcm-guidance-min", "5", "--lcm-guidance-max", "5",
                                             "--lcm-loss", "l2", "--lcm-ema-decay", "0"]))
    assert (cfg.train, cfg.lcm_skip, cfg.lcm_guidance_min, cfg.lcm_guidance_max, cfg.lcm_loss, cfg.lcm_ema_decay) == \
        ("lcm-lora", 50, 5.0, 5.0, "l2", 0.0)
    with pytest.raises(SystemExit):
        p.parse_args(["--data", "d", "--output", "o", "--lcm-loss", "l1"])


# ------------------------------------------------------------------------------------------------ the committed LoRA
def test_the_committed_lcm_lora_samples_as_in_diffusers_and_as_measured():
    """weights/minidiff-shapes-lcm-lora on the embedded model: diffusers' load_lora_weights + LCMScheduler gives
    minidiff's image; its 4-step adherence is the measured one (the detector's decisions may flip on an image or two
    on another CPU, whose rounding differs: 5 points)."""
    diffusers = pytest.importorskip("diffusers")
    pytest.importorskip("peft")
    from minidiff.checkpoint import DEFAULT_MODEL
    from minidiff.data.shapes import TRAIN_PAIRS
    from minidiff.shapes_eval import evaluate

    pipe = apply_lora(minidiff.load(), COMMITTED / "lora.safetensors")
    kw = dict(num_inference_steps=4, guidance_scale=1.0)
    ours = pipe.generate(["a red circle", "a blue triangle"], steps=4, guidance_scale=1.0, scheduler="lcm", seed=0,
                         output="tensor", progress=False)
    dpipe = diffusers.StableDiffusionPipeline.from_pretrained(str(DEFAULT_MODEL), safety_checker=None)
    dpipe.set_progress_bar_config(disable=True)
    dpipe.load_lora_weights(str(COMMITTED / "lora.safetensors"))
    dpipe.scheduler = diffusers.LCMScheduler.from_config(dpipe.scheduler.config)
    theirs = dpipe(["a red circle", "a blue triangle"], generator=torch.Generator().manual_seed(0),
                   output_type="pt", **kw).images
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)

    measured = json.loads((COMMITTED / "few_steps.json").read_text())
    row = next(r for r in measured["rows"] if r["method"] == "lcm-lora" and r["steps"] == 4)
    now = evaluate(pipe, TRAIN_PAIRS, seeds=range(8), steps=4, scheduler="lcm", guidance_scale=1.0)
    assert abs(now["accuracy"] - row["trained"]) <= 0.05
