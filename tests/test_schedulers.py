"""Chapter 9: every minidiff scheduler against the diffusers scheduler built from the same config dict.

A fixed fake "network" (eps = 0.1·x + sin(t/50)) drives both samplers through whole loops; timesteps must be equal,
and the sample after every step within 1e-5 (fp32, relative to the sample's scale). The one exception to equal
timesteps: DPM2's midpoints, whose fractional t diffusers computes in float32 through a mix of numpy and torch
operations and minidiff in float64 rounded to float32 — they agree to 2 float32 ulps (2·2⁻²³ relative).
"""
import inspect
import json
import warnings

import diffusers
import pytest
import torch

from minidiff.schedulers import (A1111_ALIASES, A1111_NAMES, DIFFUSERS_CLASSES, KARRAS, SCHEDULER_NAMES, SCHEDULERS,
                                 SD_V1_CONFIG, DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler,
                                 DPMSolverMultistepSDEScheduler, EulerAncestralDiscreteScheduler,
                                 EulerDiscreteScheduler, HeunDiscreteScheduler, KDPM2AncestralDiscreteScheduler,
                                 KDPM2DiscreteScheduler, LCMScheduler, LMSDiscreteScheduler, PNDMScheduler,
                                 UniPCMultistepScheduler, consistency_scalings, make_scheduler, resolve,
                                 scheduler_name, split_karras)

diffusers.utils.logging.set_verbosity_error()  # silence "config attributes ... will be ignored"

SD = dict(SD_V1_CONFIG)
LINEAR_V = {**SD, "beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02, "timestep_spacing": "trailing",
            "prediction_type": "v_prediction"}
COSINE = {**SD, "beta_schedule": "squaredcos_cap_v2", "timestep_spacing": "linspace", "set_alpha_to_one": True}
SHAPE = (2, 4, 8, 8)


def fake_model(x, t):
    """A deterministic stand-in for the U-Net: depends on both the sample and the timestep."""
    return 0.1 * x + torch.sin(torch.as_tensor(t, dtype=torch.float32) / 50.0)


def pair(name, cfg):
    """Ours by name ("dpmpp_karras" included) and diffusers' class built from the same config (+ what the name set:
    Karras σ's, DPM++ SDE's algorithm_type)."""
    ours = make_scheduler(name, cfg)
    base, karras = split_karras(name)
    extra = {"use_karras_sigmas": True} if karras else {}
    if base == "dpmpp_sde":
        extra["algorithm_type"] = "sde-dpmsolver++"
    ref = getattr(diffusers, ours.class_name).from_config({**cfg, **extra})
    return ours, ref


MIDPOINT_T = dict(rtol=2 * 2 ** -23, atol=0)  # DPM2's midpoint timesteps (see the top)


def same_timesteps(ours, ref):
    if isinstance(ours, KDPM2DiscreteScheduler):  # float32 ours; diffusers' are float64 with Karras σ's
        torch.testing.assert_close(ours.timesteps, ref.timesteps.to(ours.timesteps.dtype), **MIDPOINT_T)
        assert torch.equal(ours.timesteps[::2], ref.timesteps[::2].to(ours.timesteps.dtype))  # the steps' own t
        return
    assert torch.equal(ours.timesteps, ref.timesteps) and ours.timesteps.dtype == ref.timesteps.dtype


def close(a, b, tol=1e-5):
    assert torch.isfinite(b).all()
    torch.testing.assert_close(a, b, rtol=tol, atol=tol * max(1.0, b.abs().max().item()))


def run_loops(ours, ref, n, seed=None, ours_kw=None, ref_kw=None, noises=None, dtype=torch.float32):
    """Sample with both schedulers from the same x_T; compare after every step. Returns the final samples.
    seed: both get a fresh torch.Generator with it; noises: a list of explicit noise tensors for ours only."""
    ours.set_timesteps(n)
    ref.set_timesteps(n)
    same_timesteps(ours, ref)
    assert ours.order == ref.order
    assert isinstance(ours.init_noise_sigma, float)
    assert ours.init_noise_sigma == pytest.approx(float(ref.init_noise_sigma), rel=1e-6)
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1)).to(dtype)
    a, b = x_T * ours.init_noise_sigma, x_T * ref.init_noise_sigma
    ga = torch.Generator().manual_seed(seed) if seed is not None else None
    gb = torch.Generator().manual_seed(seed) if seed is not None else None
    ref_takes_gen = "generator" in inspect.signature(ref.step).parameters
    for i, (t, t_ref) in enumerate(zip(ours.timesteps, ref.timesteps)):  # each with its own t, as its pipeline
        ea = fake_model(ours.scale_model_input(a, t), t).to(dtype)
        eb = fake_model(ref.scale_model_input(b, t_ref), t_ref).to(dtype)
        kw = dict(ours_kw or {})
        if noises is not None:
            kw["noise"] = noises[i]
        else:
            kw["generator"] = ga
        a = ours.step(ea, t, a, **kw)
        rkw = dict(ref_kw or {}, **({"generator": gb} if ref_takes_gen else {}))
        b = ref.step(eb, t_ref, b, **rkw).prev_sample
        assert a.dtype == b.dtype
        close(a.float(), b.float(), 1e-5 if dtype == torch.float32 else 1e-3)
    return a, b


# ------------------------------------------------------------------------------------ whole loops, every scheduler
@pytest.mark.parametrize("name", sorted(SCHEDULERS))
@pytest.mark.parametrize("cfg,n", [(SD, 10), (SD, 25), (SD, 50), (LINEAR_V, 20), (COSINE, 15)],
                         ids=["sd-10", "sd-25", "sd-50", "linear-trailing-v-20", "cosine-linspace-15"])
def test_loop_matches_diffusers(name, cfg, n):
    ours, ref = pair(name, cfg)
    a, b = run_loops(ours, ref, n, seed=0)
    close(a, b)


@pytest.mark.parametrize("name", [f"{n}_karras" for n in KARRAS])
@pytest.mark.parametrize("cfg,n", [(SD, 10), (SD, 30), (LINEAR_V, 20)], ids=["sd-10", "sd-30", "linear-trailing-v-20"])
def test_karras_loop_matches_diffusers(name, cfg, n):
    """use_karras_sigmas=True (the "_karras" names): σ_i from Karras eq. 5, t from σ."""
    ours, ref = pair(name, cfg)
    assert ours.config["use_karras_sigmas"] is True
    a, b = run_loops(ours, ref, n, seed=0)
    # Heun and DPM2 keep one σ per step; diffusers' table repeats them, once per network call
    close(ours.sigmas, torch.unique_consecutive(ref.sigmas) if ours.order == 2 else ref.sigmas)
    close(a, b)


@pytest.mark.parametrize("extra,n", [({"prediction_type": "v_prediction"}, 12), ({"timestep_spacing": "leading"}, 20),
                                     ({"prediction_type": "sample"}, 10), ({"beta_schedule": "linear"}, 8)],
                         ids=["v", "leading", "pred-sample", "linear"])
def test_lms_options(extra, n):
    ours, ref = pair("lms", {**SD, **extra})
    run_loops(ours, ref, n)


@pytest.mark.parametrize("extra,n", [({"prediction_type": "v_prediction"}, 12), ({"timestep_spacing": "leading"}, 20),
                                     ({"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}, 10)],
                         ids=["v", "leading", "zero-snr"])
def test_euler_ancestral_options(extra, n):
    ours, ref = pair("euler_a", {**SD, **extra})
    run_loops(ours, ref, n, seed=5)


def test_euler_ancestral_draws_noise_every_step_like_diffusers():
    """The generator advances once per step, the last one included (σ_up = 0 there): explicit noise z_i equals the
    i-th draw of the seeded generator."""
    ours, ref = pair("euler_a", SD)
    g = torch.Generator().manual_seed(2)
    noises = [torch.randn(SHAPE, generator=g) for _ in range(8)]
    a, b = run_loops(ours, ref, 8, seed=2, noises=noises)
    close(a, b)


def test_lms_coefficients_integrate_the_lagrange_basis():
    """c_ij is ∫ ℓ_j over [σ_i, σ_{i+1}]; the k weights of one step sum to σ_{i+1} - σ_i (ℓ's sum to 1), checked
    against a numerical integral written out here."""
    s = make_scheduler("lms", SD)
    s.set_timesteps(10)
    sig = s.sigmas.double()
    i, k = 5, 4
    for j in range(k):
        tau = torch.linspace(float(sig[i]), float(sig[i + 1]), 20001, dtype=torch.float64)
        ell = torch.ones_like(tau)
        for m in range(k):
            if m != j:
                ell = ell * (tau - sig[i - m]) / (sig[i - j] - sig[i - m])
        assert s.lms_coefficient(k, i, j) == pytest.approx(torch.trapezoid(ell, tau).item(), rel=1e-6, abs=1e-9)
    total = sum(s.lms_coefficient(k, i, j) for j in range(k))
    assert total == pytest.approx(float(sig[i + 1] - sig[i]), rel=1e-9)


@pytest.mark.parametrize("name", sorted(SCHEDULER_NAMES))
@pytest.mark.parametrize("strength", [0.3, 0.75])
def test_mid_schedule_start_matches_diffusers(name, strength):
    """Image-to-image starts part-way down: timesteps[t_start:], set_begin_index(t_start) where the sampler has one,
    x = add_noise(x_0, ε, first t), then the loop — and, as inpainting does, add_noise at the next t after each
    step (which then reads the current step index)."""
    n = 10
    ours, ref = pair(name, SD)
    ours.set_timesteps(n)
    ref.set_timesteps(n)
    t_start = (n - int(n * strength)) * ours.order   # 2nd-order samplers list every step twice
    ts = ours.timesteps[t_start:]
    same_timesteps(ours, ref)
    for s in (ours, ref):
        if hasattr(ref, "set_begin_index"):
            s.set_begin_index(t_start)
    x0, eps = torch.randn(SHAPE, generator=torch.Generator().manual_seed(4)), torch.randn(SHAPE)
    a, b = ours.add_noise(x0, eps, ts[:1].repeat(2)), ref.add_noise(x0, eps, ref.timesteps[t_start:][:1].repeat(2))
    close(a, b)
    ga, gb = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    ref_takes_gen = "generator" in inspect.signature(ref.step).parameters
    for i, (t, t_ref) in enumerate(zip(ts, ref.timesteps[t_start:])):
        a = ours.step(fake_model(ours.scale_model_input(a, t), t), t, a, generator=ga)
        b = ref.step(fake_model(ref.scale_model_input(b, t_ref), t_ref), t_ref, b,
                     **({"generator": gb} if ref_takes_gen else {})).prev_sample
        close(a, b)
        if i < len(ts) - 1:
            close(ours.add_noise(x0, eps, ts[i + 1:i + 2]), ref.add_noise(x0, eps, ref.timesteps[t_start + i + 1:][:1]))


# -------------------------------------------------------------------------------------------- per-scheduler options
@pytest.mark.parametrize("extra", [{"variance_type": "fixed_large"}, {"variance_type": "fixed_small_log"},
                                   {"clip_sample": True, "prediction_type": "sample"},
                                   {"timestep_spacing": "linspace", "rescale_betas_zero_snr": True,
                                    "prediction_type": "v_prediction"}],
                         ids=["fixed_large", "fixed_small_log", "clip-sample-pred", "linspace-zero-snr"])
def test_ddpm_options(extra):
    ours, ref = pair("ddpm", {**SD, **extra})
    run_loops(ours, ref, 25, seed=7)


def test_ddpm_explicit_noise_equals_generator_draws():
    """Explicit noise = what diffusers draws from the seeded generator at each step with t > 0 (none at t = 0)."""
    ours, ref = pair("ddpm", SD)
    ours.set_timesteps(10)
    g = torch.Generator().manual_seed(5)
    noises = [torch.randn(SHAPE, generator=g) if t > 0 else None for t in ours.timesteps]
    a, b = run_loops(ours, ref, 10, seed=5, noises=noises)
    close(a, b)


def test_ddpm_full_1000_step_chain_prev_timestep():
    """Before set_timesteps DDPM walks t -> t-1 over all T steps, like diffusers."""
    ours, ref = pair("ddpm", SD)
    x = torch.randn(SHAPE)
    for t in [999, 500, 1, 0]:
        e = fake_model(x, t)
        g1, g2 = torch.Generator().manual_seed(t), torch.Generator().manual_seed(t)
        close(ours.step(e, t, x, generator=g1), ref.step(e, t, x, generator=g2).prev_sample)


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_ddim_eta_with_generator(eta):
    ours, ref = pair("ddim", SD)
    a, b = run_loops(ours, ref, 25, seed=3, ours_kw={"eta": eta}, ref_kw={"eta": eta})
    close(a, b)


def test_ddim_eta_with_explicit_noise():
    ours, ref = pair("ddim", SD)
    g = torch.Generator().manual_seed(9)
    noises = [torch.randn(SHAPE, generator=g) for _ in range(20)]
    ours.set_timesteps(20)
    ref.set_timesteps(20)
    a = b = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    for i, t in enumerate(ours.timesteps):
        a = ours.step(fake_model(a, t), t, a, eta=0.8, noise=noises[i])
        b = ref.step(fake_model(b, t), t, b, eta=0.8, variance_noise=noises[i]).prev_sample
        close(a, b)


def test_ddim_clip_and_clipped_model_output():
    ours, ref = pair("ddim", {**COSINE, "clip_sample": True})
    kw = {"eta": 0.3, "use_clipped_model_output": True}
    run_loops(ours, ref, 15, seed=2, ours_kw=kw, ref_kw=kw)


@pytest.mark.parametrize("spacing", ["leading", "linspace"])
def test_pndm_prk_mode(spacing):
    """F-PNDM: 12 Runge–Kutta calls first, then PLMS."""
    ours, ref = pair("pndm", {**SD, "skip_prk_steps": False, "timestep_spacing": spacing})
    a, b = run_loops(ours, ref, 20)
    close(a, b)


@pytest.mark.parametrize("extra,n", [({"use_karras_sigmas": True}, 20), ({"timestep_spacing": "leading"}, 25),
                                     ({"final_sigmas_type": "sigma_min"}, 10),
                                     ({"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}, 10),
                                     ({"prediction_type": "sample"}, 10)],
                         ids=["karras", "leading", "sigma_min", "zero-snr", "pred-sample"])
def test_euler_options(extra, n):
    ours, ref = pair("euler", {**SD, **extra})
    run_loops(ours, ref, n)


def test_euler_churn_with_generator():
    kw = {"s_churn": 1.0, "s_tmin": 0.5, "s_tmax": 10.0}
    ours, ref = pair("euler", SD)
    run_loops(ours, ref, 15, seed=4, ours_kw=kw, ref_kw=kw)


@pytest.mark.parametrize("extra,n", [({"use_karras_sigmas": True}, 20), ({"solver_order": 1}, 10),
                                     ({"solver_type": "heun"}, 12), ({"lower_order_final": False}, 10),
                                     ({"euler_at_final": True, "final_sigmas_type": "sigma_min"}, 20),
                                     ({"final_sigmas_type": "sigma_min"}, 10), ({"timestep_spacing": "leading"}, 20),
                                     ({**COSINE, "lambda_min_clipped": -5.1}, 15),
                                     ({"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}, 10),
                                     ({"prediction_type": "sample"}, 10)],
                         ids=["karras", "order1", "heun", "no-lower-final", "euler-at-final", "sigma_min", "leading",
                              "cosine-lambda-clip", "zero-snr", "pred-sample"])
def test_dpmpp_options(extra, n):
    ours, ref = pair("dpmpp", {**SD, **extra})
    run_loops(ours, ref, n)


@pytest.mark.parametrize("name", ["euler", "dpmpp", "dpmpp_sde"])
def test_fp16_samples_keep_dtype(name):
    """Euler and DPM-Solver integrate in fp32 and hand back the model's dtype, as diffusers does."""
    ours, ref = pair(name, SD)
    run_loops(ours, ref, 10, seed=0, dtype=torch.float16)


@pytest.mark.parametrize("name", ["pndm", "dpmpp", "heun", "dpm2", "unipc"])
def test_set_timesteps_resets_state(name):
    s = make_scheduler(name)
    outs = []
    for _ in range(2):
        s.set_timesteps(10)
        x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
        for t in s.timesteps:
            x = s.step(fake_model(x, t), t, x)
        outs.append(x)
    assert torch.equal(outs[0], outs[1])


# ------------------------------------------------------------------------------- Heun, DPM2: two calls per step
@pytest.mark.parametrize("extra,n", [({"prediction_type": "v_prediction"}, 12), ({"timestep_spacing": "leading"}, 20),
                                     ({"timestep_spacing": "trailing"}, 8), ({"prediction_type": "sample"}, 10),
                                     ({"clip_sample": True, "clip_sample_range": 0.8}, 10)],
                         ids=["v", "leading", "trailing", "pred-sample", "clip"])
def test_heun_options(extra, n):
    ours, ref = pair("heun", {**SD, **extra})
    run_loops(ours, ref, n)


@pytest.mark.parametrize("name", ["dpm2", "dpm2_a"])
@pytest.mark.parametrize("extra,n", [({"prediction_type": "v_prediction"}, 12), ({"timestep_spacing": "leading"}, 20),
                                     ({"timestep_spacing": "trailing"}, 7)], ids=["v", "leading", "trailing"])
def test_dpm2_options(name, extra, n):
    ours, ref = pair(name, {**SD, **extra})
    run_loops(ours, ref, n, seed=3)


def test_second_order_timesteps_and_calls():
    """n steps = 2n - 1 network calls: t_0, then per later step the corrector's t and the step's own, written out
    (Heun: the landing point's t; DPM2: the midpoint's, √(σ_k σ_{k+1}) in σ)."""
    heun, dpm2 = make_scheduler("heun"), make_scheduler("dpm2")
    heun.set_timesteps(4)
    dpm2.set_timesteps(4)
    euler = make_scheduler("euler")
    euler.set_timesteps(4)
    t = euler.timesteps
    assert heun.timesteps.tolist() == [t[0], t[1], t[1], t[2], t[2], t[3], t[3]]
    assert len(dpm2.timesteps) == 7 and dpm2.timesteps[::2].tolist() == t.tolist()
    torch.testing.assert_close(dpm2.sigmas_mid[:-1], (euler.sigmas[:-2] * euler.sigmas[1:-1]).sqrt())
    assert dpm2.sigmas_mid[-1] == 0  # the last step is a plain Euler step to σ = 0


def test_dpm2_ancestral_draws_noise_once_per_step_like_diffusers():
    """One z per step, at its second call; none at the last step (a single call): explicit z's taken from a seeded
    generator in that order give diffusers' result with the same seed."""
    n = 6
    ours, ref = pair("dpm2_a", SD)
    g = torch.Generator().manual_seed(4)
    noises = [torch.randn(SHAPE, generator=g) if i % 2 else None for i in range(2 * n - 1)]
    a, b = run_loops(ours, ref, n, seed=4, noises=noises)
    close(a, b)


# ----------------------------------------------------------------------------------------------- DPM++ 2M SDE
@pytest.mark.parametrize("extra,n", [({"solver_type": "heun"}, 12), ({"solver_order": 1}, 10),
                                     ({"final_sigmas_type": "sigma_min"}, 10), ({"timestep_spacing": "leading"}, 20),
                                     ({"prediction_type": "v_prediction"}, 10), ({"lower_order_final": False}, 20)],
                         ids=["heun", "order1", "sigma_min", "leading", "v", "no-lower-final"])
def test_dpmpp_sde_options(extra, n):
    ours, ref = pair("dpmpp_sde", {**SD, **extra})
    run_loops(ours, ref, n, seed=6)


def test_dpmpp_sde_draws_noise_every_step_like_diffusers():
    """z at every step, the last included (σ_t = 0 multiplies it away), fp32: explicit noise = the generator's
    draws."""
    n = 8
    ours, ref = pair("dpmpp_sde", SD)
    g = torch.Generator().manual_seed(2)
    noises = [torch.randn(SHAPE, generator=g) for _ in range(n)]
    a, b = run_loops(ours, ref, n, seed=2, noises=noises)
    close(a, b)


def test_dpmpp_sde_is_the_ode_without_noise():
    """With z = 0 the SDE's 1st-order step is not the ODE's: it removes more of x̃_s (weight e^{-2h} vs e^{-h}
    relative to the ODE's σ_t/σ_s): checked on one step, by the formulas written out."""
    s = make_scheduler("dpmpp_sde")
    s.set_timesteps(10)
    x, x0 = torch.randn(SHAPE), torch.randn(SHAPE)
    s._step_index = 3
    sig_s, sig_t = s.sigmas[3], s.sigmas[4]
    a_s, a_t = 1 / (sig_s ** 2 + 1) ** 0.5, 1 / (sig_t ** 2 + 1) ** 0.5
    h = torch.log(a_t / (sig_t * a_t)) - torch.log(a_s / (sig_s * a_s))
    expected = (sig_t * a_t) / (sig_s * a_s) * torch.exp(-h) * x + a_t * (1 - torch.exp(-2 * h)) * x0
    close(s.first_order_update(x0, x, torch.zeros(SHAPE)), expected)


# ------------------------------------------------------------------------------------------------------ UniPC
# (bh1 and the noise-prediction form end in NaN in diffusers when the last σ is 0 — inf · 0 in B(h) or σ_t h φ_1 —
# so they are compared with final_sigmas_type "sigma_min")
LAST = {"final_sigmas_type": "sigma_min"}


@pytest.mark.parametrize("extra,n", [({"solver_type": "bh1", **LAST}, 12), ({"solver_order": 1}, 10),
                                     ({"solver_order": 3}, 15), ({"predict_x0": False, **LAST}, 12),
                                     ({"predict_x0": False, "solver_type": "bh1", "solver_order": 3, **LAST}, 10),
                                     ({"disable_corrector": [0, 3]}, 10), ({"lower_order_final": False,
                                                                          "final_sigmas_type": "sigma_min"}, 12),
                                     ({"final_sigmas_type": "sigma_min"}, 10), ({"timestep_spacing": "leading"}, 20),
                                     ({"timestep_spacing": "trailing"}, 9), ({"prediction_type": "v_prediction"}, 10),
                                     ({"prediction_type": "sample"}, 10),
                                     ({"use_karras_sigmas": True, "final_sigmas_type": "sigma_min"}, 10),
                                     ({"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}, 10)],
                         ids=["bh1", "order1", "order3", "eps-model", "eps-bh1-order3", "disable-corrector",
                              "no-lower-final", "sigma_min", "leading", "trailing", "v", "pred-sample",
                              "karras-sigma_min", "zero-snr"])
def test_unipc_options(extra, n):
    ours, ref = pair("unipc", {**SD, **extra})
    run_loops(ours, ref, n)


def test_unipc_corrector_is_free():
    """The corrector reuses the network call of the next step: n steps, n calls (order 1, as diffusers)."""
    s = make_scheduler("unipc")
    s.set_timesteps(7)
    assert s.order == 1 and len(s.timesteps) == 7


# ------------------------------------------------------------------------------------------------------- LCM
@pytest.mark.parametrize("extra,n", [({"prediction_type": "v_prediction"}, 4), ({"prediction_type": "sample"}, 4),
                                     ({"original_inference_steps": 20}, 6), ({"timestep_scaling": 5.0}, 8),
                                     ({"clip_sample": True, "prediction_type": "sample"}, 3), ({}, 1), ({}, 50)],
                         ids=["v", "pred-sample", "orig-20", "scaling-5", "clip", "one-step", "fifty"])
def test_lcm_options(extra, n):
    ours, ref = pair("lcm", {**SD, **extra})
    run_loops(ours, ref, n, seed=8)


def test_lcm_timesteps_from_the_distillation_grid():
    """4 of the 50-step grid t = 20k - 1 (k = 1..50), evenly by index from the top (LCM's paper / diffusers)."""
    s = make_scheduler("lcm")
    s.set_timesteps(4)
    assert s.timesteps.tolist() == [999, 759, 499, 259]
    s.set_timesteps(2, original_inference_steps=10)
    assert s.timesteps.tolist() == [999, 499]
    with pytest.raises(ValueError, match="at most original_inference_steps=50"):
        s.set_timesteps(51)


def test_lcm_draws_noise_between_steps_like_diffusers():
    """Fresh z after every step but the last (which returns f_θ): explicit z's = the generator's draws."""
    n = 5
    ours, ref = pair("lcm", SD)
    g = torch.Generator().manual_seed(3)
    noises = [torch.randn(SHAPE, generator=g) if i < n - 1 else None for i in range(n)]
    a, b = run_loops(ours, ref, n, seed=3, noises=noises)
    close(a, b)


def test_consistency_scalings_and_boundary_condition():
    """c_skip = σ_d²/((10t)² + σ_d²), c_out = 10t/√((10t)² + σ_d²), written out; f(x, 0) = x; diffusers' values;
    the batched consistency function (one t per sample, as distillation uses it) = one sample at a time."""
    c_skip, c_out = consistency_scalings(torch.tensor(0))
    assert c_skip == 1 and c_out == 0
    ref = diffusers.LCMScheduler.from_config(SD)
    for t in (1, 19, 259, 999):
        c_skip, c_out = consistency_scalings(t)
        assert float(c_skip) == pytest.approx(0.25 / ((10 * t) ** 2 + 0.25), rel=1e-6)
        assert float(c_out) == pytest.approx(10 * t / ((10 * t) ** 2 + 0.25) ** 0.5, rel=1e-6)
        ref_skip, ref_out = ref.get_scalings_for_boundary_condition_discrete(torch.tensor(t))
        assert float(c_skip) == float(ref_skip) and float(c_out) == float(ref_out)
    s = make_scheduler("lcm")
    x, eps = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    t = torch.tensor([0, 259, 999])
    batched = s.consistency_output(eps, t, x)
    for i in range(3):
        close(batched[i:i + 1], s.consistency_output(eps[i:i + 1], int(t[i]), x[i:i + 1]))
    close(batched[0], x[0])   # the boundary condition: f(x, 0) = x, whatever the network says


# --------------------------------------------------------------------------------------- schedules and add_noise
@pytest.mark.parametrize("cfg", [SD, LINEAR_V, COSINE, {**SD, "rescale_betas_zero_snr": True},
                                 {**SD, "trained_betas": torch.linspace(1e-4, 0.03, 1000).tolist()},
                                 {**SD, "num_train_timesteps": 500}],
                         ids=["scaled_linear", "linear", "cosine", "zero-snr", "trained_betas", "T500"])
@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_schedule_tables(name, cfg):
    ours, ref = pair(name, cfg)
    close(ours.betas, ref.betas, 1e-6)
    close(ours.alphas_cumprod, ref.alphas_cumprod, 1e-6)
    assert ours.num_train_timesteps == ref.config.num_train_timesteps


@pytest.mark.parametrize("name", ["ddpm", "ddim", "pndm"])
@pytest.mark.parametrize("cfg", [SD, COSINE], ids=["sd", "cosine"])
def test_add_noise_and_velocity(name, cfg):
    ours, ref = pair(name, cfg)
    x0, noise = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    t = torch.tensor([0, 17, 500, 999])
    close(ours.add_noise(x0, noise, t), ref.add_noise(x0, noise, t))
    if hasattr(ref, "get_velocity"):
        close(ours.get_velocity(x0, noise, t), ref.get_velocity(x0, noise, t))


def test_euler_add_noise_before_and_after_set_timesteps():
    ours, ref = pair("euler", SD)
    x0, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    t = torch.tensor([3, 400, 999])
    close(ours.add_noise(x0, noise, t), ref.add_noise(x0, noise, t.float()))
    ours.set_timesteps(20)
    ref.set_timesteps(20)
    t = ours.timesteps[[0, 7, 19]]
    close(ours.add_noise(x0, noise, t), ref.add_noise(x0, noise, t))


def test_dpmpp_add_noise_after_set_timesteps():
    ours, ref = pair("dpmpp", SD)
    ours.set_timesteps(20)
    ref.set_timesteps(20)
    x0, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    t = ours.timesteps[[0, 7, 19]]
    close(ours.add_noise(x0, noise, t), ref.add_noise(x0, noise, t))


def test_add_noise_matches_forward_process_formula():
    """x_t = √ᾱ_t x_0 + √(1-ᾱ_t) ε, written out (independent of diffusers)."""
    s = DDPMScheduler.from_config(SD)
    x0, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    t = torch.tensor([10, 900])
    ab = torch.cumprod(1 - torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2, 0)[t].view(2, 1, 1, 1)
    close(s.add_noise(x0, noise, t), ab.sqrt() * x0 + (1 - ab).sqrt() * noise)


# ------------------------------------------------------------------------------------------------------- config
MINIDIFF_NAMES = ("ddim, ddpm, dpm2, dpm2_a, dpm2_a_karras, dpm2_karras, dpmpp, dpmpp_karras, dpmpp_sde, "
                  "dpmpp_sde_karras, euler, euler_a, euler_karras, heun, heun_karras, lcm, lms, lms_karras, pndm, "
                  "unipc, unipc_karras")


def test_make_scheduler_unknown_name():
    with pytest.raises(ValueError, match=rf"unknown sampler 'dpm_fast'; choose one of {MINIDIFF_NAMES}, or an "
                                         r"AUTOMATIC1111 name: Euler a, Euler, LMS, Heun, DPM2, DPM2 a, DPM\+\+ 2M, "
                                         r"DPM\+\+ 2M SDE, DDIM, PLMS, UniPC, LCM \(\+ ' Karras' for Euler, LMS, "
                                         r"Heun, DPM2, DPM2 a, DPM\+\+ 2M, DPM\+\+ 2M SDE, UniPC\) \(any case\)"):
        make_scheduler("dpm_fast", SD)
    with pytest.raises(ValueError, match="unknown sampler 'euler_a_karras'"):  # diffusers' Euler-a has no Karras σ
        make_scheduler("euler_a_karras", SD)
    with pytest.raises(ValueError, match="sampler 'Euler a Karras' has no Karras σ's"):
        make_scheduler("Euler a Karras", SD)


def test_names_are_case_insensitive():
    assert type(make_scheduler("Euler_A", SD)) is EulerAncestralDiscreteScheduler
    s = make_scheduler("DPMPP_Karras", SD)
    assert type(s) is DPMSolverMultistepScheduler and s.config["use_karras_sigmas"] is True
    assert make_scheduler("dpmpp", SD).config["use_karras_sigmas"] is False


# the table the issue asks for, written out: AUTOMATIC1111's label -> the diffusers class and settings it is
A1111_TABLE = {"Euler a": "euler_a", "Euler": "euler", "LMS": "lms", "Heun": "heun", "DPM2": "dpm2",
               "DPM2 a": "dpm2_a", "DPM++ 2M": "dpmpp", "DPM++ 2M SDE": "dpmpp_sde", "DDIM": "ddim", "PLMS": "pndm",
               "UniPC": "unipc", "LCM": "lcm"}


def test_a1111_names_table():
    assert A1111_NAMES == A1111_TABLE
    for label, name in A1111_TABLE.items():
        for spelling in (label, label.upper(), label.lower(), f"  {label} "):
            assert resolve(spelling) == name
        if name in KARRAS:   # the pre-1.9 spelling and 1.9's separate "Schedule type" field
            assert resolve(f"{label} Karras") == resolve(label, "Karras") == resolve(label.lower(), "karras") == \
                f"{name}_karras"
            assert resolve(f"{label} Karras", "Automatic") == f"{name}_karras"   # the suffix wins, as in A1111
        assert resolve(label, "Automatic") == resolve(label, "") == resolve(label, None) == name
    for alias, label in A1111_ALIASES.items():
        assert resolve(alias) == resolve(label)
    assert resolve("k_dpmpp_2m_ka") == "dpmpp_karras" and resolve("K_EULER_A") == "euler_a"
    for name in SCHEDULER_NAMES:
        assert resolve(name) == resolve(name.upper()) == name
    with pytest.raises(ValueError, match="unknown schedule type 'Exponential'; minidiff has Automatic, Karras"):
        resolve("DPM++ 2M SDE", "Exponential")
    with pytest.raises(ValueError, match="sampler 'LCM' has no Karras σ's"):
        resolve("LCM", "Karras")


@pytest.mark.parametrize("label", list(A1111_TABLE))
def test_a1111_names_build_diffusers_equivalents(label):
    """Each AUTOMATIC1111 name (and its Karras form) builds the diffusers class and settings diffusers' docs give."""
    base = resolve(label)
    for name in (base, f"{base}_karras") if base in KARRAS else (base,):
        s = make_scheduler(name.replace(base, label) if name == base else f"{label} Karras", SD)
        assert type(s) is SCHEDULERS[base]
        assert s.class_name == {"dpmpp_sde": "DPMSolverMultistepScheduler"}.get(base, type(s).__name__)
        if base in KARRAS:
            assert s.config["use_karras_sigmas"] is name.endswith("_karras")
        if base.startswith("dpmpp"):
            assert s.config["algorithm_type"] == ("sde-dpmsolver++" if base == "dpmpp_sde" else "dpmsolver++")


def test_registry_and_classes():
    assert SCHEDULERS == {"pndm": PNDMScheduler, "ddim": DDIMScheduler, "ddpm": DDPMScheduler,
                          "euler": EulerDiscreteScheduler, "euler_a": EulerAncestralDiscreteScheduler,
                          "lms": LMSDiscreteScheduler, "dpmpp": DPMSolverMultistepScheduler,
                          "dpmpp_sde": DPMSolverMultistepSDEScheduler, "heun": HeunDiscreteScheduler,
                          "dpm2": KDPM2DiscreteScheduler, "dpm2_a": KDPM2AncestralDiscreteScheduler,
                          "unipc": UniPCMultistepScheduler, "lcm": LCMScheduler}
    assert ", ".join(SCHEDULER_NAMES) == MINIDIFF_NAMES
    assert DIFFUSERS_CLASSES == {cls.class_name: name for name, cls in SCHEDULERS.items() if name != "dpmpp_sde"}
    for name, cls in SCHEDULERS.items():   # every class is diffusers' own name for it
        assert hasattr(diffusers, cls.class_name), name
    for name in KARRAS:                    # and Karras σ's are offered where diffusers offers them
        assert "use_karras_sigmas" in inspect.signature(getattr(diffusers, SCHEDULERS[name].class_name)).parameters


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_config_class_names_pick_the_scheduler(name):
    """A scheduler_config.json as diffusers writes it for each class (DPM++ 2M SDE: with its algorithm_type) picks
    the sampler, with no warning, and builds it."""
    _, ref = pair(name, SD)
    config = json.loads(ref.to_json_string())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert scheduler_name(config) == name
        ours = make_scheduler(scheduler_name(config), config)
    assert type(ours) is SCHEDULERS[name]
    ours.set_timesteps(10)
    ref.set_timesteps(10)
    same_timesteps(ours, ref)


@pytest.mark.parametrize("cls", ["DEISMultistepScheduler", None])
def test_unknown_config_class_warns_and_says_what_is_used(cls):
    with pytest.warns(UserWarning, match=f"names {cls!r}, which minidiff does not implement; sampling with "
                                         "PNDMScheduler"):
        assert scheduler_name({**SD, "_class_name": cls}) == "pndm"


def test_from_config_ignores_unknown_keys():
    cfg = {**SD, "_class_name": "SomethingElse", "_diffusers_version": "0.7.0", "totally_unknown": 3}
    s = PNDMScheduler.from_config(cfg)
    assert s.config["beta_schedule"] == "scaled_linear" and s.config["steps_offset"] == 1
    assert s.config["_class_name"] == "PNDMScheduler" and s.config["totally_unknown"] == 3


def test_defaults_are_sd_v1():
    s = PNDMScheduler()
    ref = diffusers.PNDMScheduler.from_config(SD)
    s.set_timesteps(50)
    ref.set_timesteps(50)
    assert torch.equal(s.timesteps, ref.timesteps)
    close(s.alphas_cumprod, ref.alphas_cumprod, 1e-7)


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_config_round_trips_through_diffusers(name):
    """Our .config is a valid scheduler_config.json: diffusers reads it back to the same settings."""
    ours = make_scheduler(name, LINEAR_V)
    ref = getattr(diffusers, ours.class_name).from_config(ours.config)
    for key, value in ours.config.items():
        if key in ref.config and not key.startswith("_"):
            assert ref.config[key] == value, key
    again = type(ours).from_config(ours.config)
    assert again.config == ours.config


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_switching_scheduler_carries_the_schedule_like_diffusers(name):
    """make_scheduler(name, pndm.config) == diffusers' X.from_config(pndm.config): beta settings carry over, the
    PNDM's own defaults (e.g. timestep_spacing) do not."""
    pndm, ref_pndm = pair("pndm", SD)
    ours = make_scheduler(name, pndm.config)
    ref = getattr(diffusers, ours.class_name).from_config(ref_pndm.config)
    for n in (10, 30):
        ours.set_timesteps(n)
        ref.set_timesteps(n)
        same_timesteps(ours, ref)
        assert ours.init_noise_sigma == pytest.approx(float(ref.init_noise_sigma), rel=1e-6)


@pytest.mark.parametrize("name,key,value", [("dpmpp", "algorithm_type", "dpmsolver"),
                                            ("dpmpp_sde", "algorithm_type", "sde-dpmsolver"),
                                            ("ddim", "thresholding", True),
                                            ("euler", "use_exponential_sigmas", True),
                                            ("heun", "use_beta_sigmas", True), ("unipc", "use_flow_sigmas", True),
                                            ("lcm", "thresholding", True)])
def test_unsupported_options_raise(name, key, value):
    with pytest.raises(NotImplementedError, match=key):
        make_scheduler(name, {**SD, key: value})
    with pytest.raises(NotImplementedError, match="algorithm_type"):   # the class itself: only its own algorithm
        DPMSolverMultistepScheduler.from_config({**SD, "algorithm_type": "sde-dpmsolver++"})


def test_dpmpp_names_choose_the_algorithm():
    """"dpmpp" and "dpmpp_sde" are one diffusers class: the name sets algorithm_type over the config's."""
    sde_config = make_scheduler("dpmpp_sde").config
    assert sde_config["_class_name"] == "DPMSolverMultistepScheduler"
    assert scheduler_name(sde_config) == "dpmpp_sde"
    assert type(make_scheduler("dpmpp", sde_config)) is DPMSolverMultistepScheduler
    assert type(make_scheduler("DPM++ 2M SDE", make_scheduler("dpmpp").config)) is DPMSolverMultistepSDEScheduler


def test_bad_values_raise():
    with pytest.raises(ValueError, match="timestep_spacing"):
        make_scheduler("ddim", {**SD, "timestep_spacing": "sideways"})
    with pytest.raises(NotImplementedError, match="beta_schedule"):
        make_scheduler("ddpm", {**SD, "beta_schedule": "exotic"})


def test_a1111_label_is_resolves_inverse():
    """The label an infotext writes for each sampler reads back as that sampler (AUTOMATIC1111's own spellings)."""
    from minidiff.schedulers import a1111_label
    assert a1111_label("dpmpp_karras") == "DPM++ 2M Karras" and a1111_label("euler_a") == "Euler a"
    assert a1111_label("pndm") == "PLMS" and a1111_label("ddpm") == "ddpm"   # AUTOMATIC1111 has no DDPM
    for name in SCHEDULER_NAMES:
        assert resolve(a1111_label(name)) == name
    with pytest.raises(ValueError, match="not a minidiff sampler name"):
        a1111_label("DPM++ 2M")
