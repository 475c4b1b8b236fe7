"""Chapter 6: minidiff.vae against diffusers' AutoencoderKL (random weights built from the same config)."""
import pytest
import torch

from minidiff.nn import attention_impl
from minidiff.vae import AutoencoderKL, Autoencoder, DiagonalGaussian, VAEConfig

D = pytest.importorskip("diffusers")

# a 2-level VAE with SD's 32 norm groups, a 3-level one with narrow channels, and one without the 1x1 quant convs
TINY = {
    "2lvl": VAEConfig(block_out_channels=(32, 64), layers_per_block=1, sample_size=32),
    "3lvl": VAEConfig(block_out_channels=(16, 32, 32), layers_per_block=2, norm_num_groups=8, sample_size=32),
    "noquant": VAEConfig(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8, latent_channels=3,
                         use_quant_conv=False, use_post_quant_conv=False, sample_size=16),
}

# SD v1.4's vae/config.json as published (2022: no scaling_factor key, lists not tuples)
SD14_VAE_JSON = {
    "_class_name": "AutoencoderKL", "_diffusers_version": "0.2.2", "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D"],
    "in_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32, "out_channels": 3,
    "sample_size": 512,
    "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"],
}


def close(ours, theirs, rtol=1e-4):
    """max |ours - theirs| <= rtol * max |theirs|"""
    assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
    err, scale = (ours - theirs).abs().max().item(), theirs.abs().max().item()
    assert err <= rtol * max(scale, 1e-6), f"max abs err {err:.3g} vs scale {scale:.3g}"


def pair(cfg: VAEConfig, seed=0):
    """diffusers' AutoencoderKL built from our config, every weight jittered (norms start at 1/0), and ours loaded
    from its state_dict with strict=True."""
    torch.manual_seed(seed)
    theirs = D.AutoencoderKL(**cfg.to_diffusers())
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in theirs.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    ours = AutoencoderKL(cfg)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return ours.eval(), theirs.eval()


def images(cfg, batch=2, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, cfg.in_channels, size, size, generator=g) * 2 - 1


@pytest.mark.parametrize("impl", ["naive", "sdpa"])
@pytest.mark.parametrize("name", list(TINY))
@torch.no_grad()
def test_parity_with_diffusers(name, impl):
    cfg = TINY[name]
    ours, theirs = pair(cfg)
    x = images(cfg)
    f = cfg.downsample_factor
    with attention_impl(impl):
        q, p = ours.encode(x), theirs.encode(x).latent_dist
        assert q.mean.shape == (2, cfg.latent_channels, 32 // f, 32 // f)
        close(q.mean, p.mean)
        close(q.logvar, p.logvar)
        close(q.std, p.std)
        close(q.kl(), p.kl())
        # the same seeded CPU generator gives the same ε, hence the same z
        z_ours = q.sample(torch.Generator().manual_seed(7))
        z_theirs = p.sample(torch.Generator().manual_seed(7))
        close(z_ours, z_theirs)
        assert (z_ours - q.mean).abs().max() > 1e-3  # really sampled
        close(q.nll(z_ours), p.nll(z_theirs))
        q2, p2 = ours.encode(x.flip(0)), theirs.encode(x.flip(0)).latent_dist
        close(q.kl(q2), p.kl(p2))
        close(ours.decode(z_theirs), theirs.decode(z_theirs).sample)
        rec, post = ours(x)
        close(rec, theirs(x).sample)
        rec, post = ours(x, sample_posterior=True, generator=torch.Generator().manual_seed(3))
        close(rec, theirs(x, sample_posterior=True, generator=torch.Generator().manual_seed(3)).sample)


@torch.no_grad()
def test_sample_generator_list_and_non_square():
    cfg = TINY["2lvl"]
    ours, theirs = pair(cfg)
    x = torch.rand(2, 3, 16, 24) * 2 - 1
    q, p = ours.encode(x), theirs.encode(x).latent_dist
    assert q.mean.shape == (2, 4, 8, 12)
    gens = lambda: [torch.Generator().manual_seed(s) for s in (1, 2)]  # one generator per image, as diffusers allows
    close(q.sample(gens()), p.sample(gens()))
    close(ours.decode(q.mean), theirs.decode(p.mean).sample)


def test_state_dict_keys_at_sd_size():
    """SD v1.4's full VAE: our parameter names and shapes are diffusers' (built on the meta device: no memory)."""
    with torch.device("meta"):
        ours = AutoencoderKL(VAEConfig.from_diffusers(SD14_VAE_JSON))
        theirs = D.AutoencoderKL.from_config(SD14_VAE_JSON)
    a = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    b = {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
    assert a == b
    assert "decoder.up_blocks.0.resnets.2.conv1.weight" in a and "encoder.mid_block.attentions.0.to_out.0.bias" in a
    assert sum(v.numel() for v in ours.parameters()) == 83_653_863  # SD's VAE: 83.7M parameters


def test_loss_matches_its_definition_on_diffusers_outputs():
    cfg = TINY["3lvl"]
    ours, theirs = pair(cfg)
    x = images(cfg, size=16)
    total, recon, kl = ours.loss(x, kl_weight=1e-2, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        out = theirs(x, sample_posterior=True, generator=torch.Generator().manual_seed(5)).sample
        post = theirs.encode(x).latent_dist
    ref_recon = (x - out).abs().sum(dim=[1, 2, 3]).mean()
    ref_kl = post.kl().mean()
    close(recon.detach(), ref_recon)
    close(kl.detach(), ref_kl)
    close(total.detach(), ref_recon + 1e-2 * ref_kl)
    total.backward()  # the reparameterization trick: gradients reach the encoder through z = μ + σε
    assert ours.encoder.conv_in.weight.grad.abs().sum() > 0
    assert ours.quant_conv.weight.grad[cfg.latent_channels:].abs().sum() > 0  # ... including the log σ² half


def test_training_steps_reduce_loss():
    torch.manual_seed(0)
    cfg = VAEConfig(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, sample_size=16)
    x = images(cfg, batch=4, size=16)
    for model in (AutoencoderKL(cfg), Autoencoder(cfg)):
        opt = torch.optim.Adam(model.parameters(), lr=2e-3)
        # a fixed ε for the VAE, so the comparison is not at the mercy of the sampling noise
        vae = isinstance(model, AutoencoderKL)
        loss = lambda: model.loss(x, 1e-3, torch.Generator().manual_seed(0))[0] if vae else model.loss(x)
        first = loss().item()
        for _ in range(20):
            opt.zero_grad()
            l = loss()
            l.backward()
            opt.step()
        assert loss().item() < 0.7 * first, type(model).__name__


@torch.no_grad()
def test_plain_autoencoder():
    cfg = TINY["3lvl"]
    ae = Autoencoder(cfg).eval()
    x = images(cfg)
    rec, z = ae(x)
    assert z.shape == (2, cfg.latent_channels, 8, 8) and rec.shape == x.shape
    assert not hasattr(ae, "quant_conv")
    # the same decoder as the VAE's: diffusers' decoder weights load into it and decode identically
    _, theirs = pair(cfg)
    ae.decoder.load_state_dict({k[len("decoder."):]: v for k, v in theirs.state_dict().items()
                                if k.startswith("decoder.")}, strict=True)
    close(ae.decode(z), theirs.decoder(z))
    # its encoder is the VAE encoder with latent (not 2 x latent) outputs
    assert ae.encoder.conv_out.out_channels == cfg.latent_channels
    assert AutoencoderKL(cfg).encoder.conv_out.out_channels == 2 * cfg.latent_channels


def test_diagonal_gaussian_kl_closed_form():
    """½ Σ(μ² + σ² - 1 - log σ²) against torch.distributions, and KL(q||q) = 0."""
    moments = torch.randn(3, 8, 4, 5)
    q = DiagonalGaussian(moments)
    ref = torch.distributions.kl_divergence(torch.distributions.Normal(q.mean, q.std),
                                            torch.distributions.Normal(0.0, 1.0)).sum(dim=[1, 2, 3])
    close(q.kl(), ref)
    assert q.kl(q).abs().max() < 1e-5
    z = q.sample(torch.Generator().manual_seed(0))
    close(q.nll(z), -torch.distributions.Normal(q.mean, q.std).log_prob(z).sum(dim=[1, 2, 3]))
    assert q.mode() is q.mean
    big = DiagonalGaussian(torch.cat([torch.zeros(1, 1, 1, 1), torch.full((1, 1, 1, 1), 100.0)], 1))
    assert big.logvar.item() == 20.0  # clamped as diffusers does


def test_config_round_trip():
    for cfg in [VAEConfig(), *TINY.values()]:
        d = cfg.to_diffusers()
        assert d["_class_name"] == "AutoencoderKL"
        assert VAEConfig.from_diffusers(d) == cfg
    assert VAEConfig.from_diffusers(SD14_VAE_JSON) == VAEConfig()
    for cfg in TINY.values():  # and from the diffusers model's own .config (all of its keys, defaults included)
        theirs = D.AutoencoderKL.from_config(cfg.to_diffusers())
        assert VAEConfig.from_diffusers(dict(theirs.config)) == cfg
    # a key missing from the dict means diffusers' default, not SD's
    assert VAEConfig.from_diffusers({}) == VAEConfig.from_diffusers(dict(D.AutoencoderKL().config))
    assert VAEConfig.from_diffusers({}).block_out_channels == (64,)
    assert VAEConfig().downsample_factor == 8 and TINY["3lvl"].downsample_factor == 4


@pytest.mark.parametrize("key, value", [
    ("down_block_types", ["DownEncoderBlock2D", "AttnDownEncoderBlock2D"]),
    ("up_block_types", ["UpDecoderBlock2D", "AttnUpDecoderBlock2D"]),
    ("down_block_types", ["DownEncoderBlock2D"] * 3),
    ("act_fn", "gelu"),
    ("mid_block_add_attention", False),
    ("shift_factor", 0.0609),
    ("latents_mean", [0.0] * 4),
    ("norm_type", "spatial"),
])
def test_bad_config_names_the_key(key, value):
    d = {**TINY["2lvl"].to_diffusers(), key: value}
    with pytest.raises(ValueError, match=key):
        VAEConfig.from_diffusers(d)


def test_image_size_must_divide():
    vae = AutoencoderKL(TINY["3lvl"])
    with pytest.raises(ValueError, match="multiple"):
        vae.encode(torch.zeros(1, 3, 30, 32))


@pytest.mark.slow
@torch.no_grad()
def test_parity_sd14_size():
    cfg = VAEConfig.from_diffusers(SD14_VAE_JSON)
    ours, theirs = pair(cfg)
    x = images(cfg, batch=1, size=64)
    q, p = ours.encode(x), theirs.encode(x).latent_dist
    assert q.mean.shape == (1, 4, 8, 8)
    close(q.mean, p.mean)
    close(q.logvar, p.logvar)
    close(q.kl(), p.kl())
    close(q.sample(torch.Generator().manual_seed(1)), p.sample(torch.Generator().manual_seed(1)))
    close(ours.decode(p.mean), theirs.decode(p.mean).sample)
    for impl in ("naive", "sdpa"):
        with attention_impl(impl):
            close(ours(x)[0], theirs(x).sample)
