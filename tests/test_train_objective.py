"""minidiff.train.objective: min-SNR-γ weights and the weighted loss against diffusers' training utilities, and the
micro-step loss's targets (ε or v of the sample's own z₀, ε, t; a dropped caption is the empty prompt's context)."""
import pytest
import torch

from minidiff.train.data import SampleStream, collate
from minidiff.train.objective import diffusion_loss, micro_step_loss, min_snr_weights, snr
from tiny_runs import build_tiny_pipe


def test_min_snr_weights_match_diffusers():
    """w(t) = min(SNR, γ)/SNR (ε) and min(SNR, γ)/(SNR + 1) (v), as diffusers' train_text_to_image.py computes them."""
    from diffusers import DDPMScheduler as DiffusersDDPM
    from diffusers.training_utils import compute_snr

    from minidiff.schedulers import DDPMScheduler
    cfg = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000}
    ours, theirs = DDPMScheduler.from_config(cfg), DiffusersDDPM.from_config(cfg)
    t = torch.tensor([0, 1, 10, 100, 250, 500, 750, 999])
    want = compute_snr(theirs, t)
    gamma = 5.0
    capped = torch.stack([want, gamma * torch.ones_like(t)], dim=1).min(dim=1)[0]
    torch.testing.assert_close(snr(ours.alphas_cumprod, t), want, rtol=1e-5, atol=0)
    torch.testing.assert_close(min_snr_weights(ours.alphas_cumprod, t, gamma), capped / want, rtol=1e-5, atol=0)
    torch.testing.assert_close(min_snr_weights(ours.alphas_cumprod, t, gamma, "v_prediction"), capped / (want + 1),
                               rtol=1e-5, atol=0)
    # and the weighted loss is the per-sample MSE times those weights, averaged
    pred, target = torch.randn(8, 4, 3, 3), torch.randn(8, 4, 3, 3)
    expected = (((pred - target) ** 2).mean(dim=(1, 2, 3)) * capped / want).mean()
    torch.testing.assert_close(diffusion_loss(pred, target, t, ours.alphas_cumprod, gamma), expected,
                               rtol=1e-5, atol=0)
    assert diffusion_loss(pred, target, t, ours.alphas_cumprod) == torch.nn.functional.mse_loss(pred, target)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_micro_step_targets(tiny, prediction_type):
    """The loss is the MSE against ε (or v = √ᾱ ε − √(1−ᾱ) z₀) of the sample's own z₀, ε (with the noise offset) and
    t: a model that returns exactly that target scores 0."""
    from minidiff.data.imagefolder import ImageFolderDataset
    pipe = build_tiny_pipe(0, prediction_type)
    sched = pipe.make_scheduler("ddpm")
    stream = SampleStream(ImageFolderDataset(tiny["data"], 16), 1000, (4, 8, 8), seed=0, caption_dropout=0.5)
    batch = collate([stream[p] for p in (3, 4, 5)])
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

    loss = micro_step_loss(batch, pipe, oracle, sched, sched.alphas_cumprod, prediction_type, torch.device("cpu"),
                           lambda: torch.autocast("cpu", enabled=False), noise_offset=0.1)
    assert float(loss) < 1e-10
    torch.testing.assert_close(seen["x"], zt, rtol=1e-5, atol=1e-5)
    # a dropped caption is the empty prompt's encoding
    empty = pipe.text_encoder(pipe.tokenizer([""]))[0]
    for i, text in enumerate(batch["text"]):
        assert torch.equal(seen["context"][i], empty) == (text == "")
