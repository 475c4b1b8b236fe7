"""minidiff.unet against diffusers' UNet2DConditionModel (the oracle), built with random weights from the same config:
its state_dict loads into ours with strict=True and both compute the same noise prediction (fp32, 1e-4 relative)."""
import time

import pytest
import torch

from minidiff import kernels

from minidiff.nn import attention_impl
from minidiff.unet import UNet, UNetConfig

# SD v1.4's unet/config.json as published (CompVis/stable-diffusion-v1-4, diffusers layout)
SD_V14 = {"_class_name": "UNet2DConditionModel", "_diffusers_version": "0.2.2", "act_fn": "silu",
          "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": False,
          "cross_attention_dim": 768,
          "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
          "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
          "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4, "sample_size": 64,
          "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]}

# stabilityai/stable-diffusion-2-1 (768-v): linear projections, per-level heads, fp32 upcast, 1024-wide text
SD_V21 = {"_class_name": "UNet2DConditionModel", "act_fn": "silu", "attention_head_dim": [5, 10, 20, 20],
          "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": False, "cross_attention_dim": 1024,
          "down_block_types": SD_V14["down_block_types"], "downsample_padding": 1, "dual_cross_attention": False,
          "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
          "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32, "num_class_embeds": None,
          "only_cross_attention": False, "out_channels": 4, "sample_size": 96, "up_block_types": SD_V14["up_block_types"],
          "upcast_attention": True, "use_linear_projection": True}

# stabilityai/stable-diffusion-xl-base-1.0: added text/time embeddings, 10-deep transformers at the bottom
SDXL = {"_class_name": "UNet2DConditionModel", "act_fn": "silu", "addition_embed_type": "text_time",
        "addition_embed_type_num_heads": 64, "addition_time_embed_dim": 256, "attention_head_dim": [5, 10, 20],
        "block_out_channels": [320, 640, 1280], "center_input_sample": False, "cross_attention_dim": 2048,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"], "downsample_padding": 1,
        "dual_cross_attention": False, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4,
        "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32,
        "out_channels": 4, "projection_class_embeddings_input_dim": 2816, "sample_size": 128,
        "transformer_layers_per_block": [1, 2, 10], "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                                                                       "UpBlock2D"],
        "upcast_attention": None, "use_linear_projection": True}

TINY = {
    "2lvl-L1-attn-top": UNetConfig(block_out_channels=(32, 64), layers_per_block=1, cross_attention=(True, False),
                                   heads=2, cross_attention_dim=32, norm_num_groups=32, sample_size=8),
    "2lvl-L2-attn-bottom": UNetConfig(block_out_channels=(32, 64), layers_per_block=2, cross_attention=(False, True),
                                      heads=4, cross_attention_dim=32, norm_num_groups=8, sample_size=8),
    "2lvl-8heads-2deep": UNetConfig(block_out_channels=(32, 64), layers_per_block=1, cross_attention=(True, True),
                                    heads=8, cross_attention_dim=24, norm_num_groups=8, transformer_layers=2,
                                    in_channels=3, out_channels=5, flip_sin_to_cos=False, freq_shift=1),
    "sd-pattern-4lvl": UNetConfig(block_out_channels=(16, 32, 32, 32), layers_per_block=2,
                                  cross_attention=(True, True, True, False), heads=8, cross_attention_dim=32,
                                  norm_num_groups=8, sample_size=8),
}


def jitter(model, seed=0):
    """diffusers initialises norms to 1/0 and some biases to 0; randomise every weight so parity means something."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


def make_pair(cfg, seed=0):
    from diffusers import UNet2DConditionModel
    torch.manual_seed(seed)
    ref = jitter(UNet2DConditionModel(**cfg.to_diffusers()), seed)
    ours = UNet(cfg).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ours, ref


def assert_close_rel(ours, ref, rel=1e-4):
    assert ours.shape == ref.shape
    scale = ref.abs().max().item()
    err = (ours - ref).abs().max().item()
    assert err <= rel * scale, f"max |diff| {err:.3g} > {rel} x output scale {scale:.3g}"


@pytest.fixture(scope="module", params=list(TINY), ids=list(TINY))
def pair(request):
    cfg = TINY[request.param]
    return (cfg, *make_pair(cfg))


@pytest.mark.parametrize("impl", ["sdpa", "naive"])
def test_matches_diffusers(pair, impl):
    cfg, ours, ref = pair
    g = torch.Generator().manual_seed(1)
    B, C = 2, cfg.in_channels
    cases = [  # (latent size, t, context length)
        ((8, 8), 999, 77),                                   # python int, broadcast to the batch
        ((8, 8), torch.tensor([1, 640]), 77),                # one timestep per sample
        ((8, 16), torch.tensor(250), 5),                     # 0-dim tensor; a non-square latent; a short context
        ((8, 8), torch.tensor([37.5, 0.25]), 1),             # float timesteps (diffusers accepts them too)
        ((8, 8), 401.7, 80),                                 # python float; a context longer than 77
        ((9, 7), torch.tensor([5, 900]), 77),                # odd sizes: upsampled to the skips' sizes
    ]
    with torch.no_grad(), attention_impl(impl):
        for hw, t, S in cases:
            x = torch.randn(B, C, *hw, generator=g)
            ctx = torch.randn(B, S, cfg.cross_attention_dim, generator=g)
            out = ours(x, t, ctx)
            assert out.shape == (B, cfg.out_channels, *hw)
            assert_close_rel(out, ref(x, t, ctx).sample)


def test_state_dict_keys_are_diffusers_keys(pair):
    cfg, ours, ref = pair
    assert sorted(ours.state_dict()) == sorted(ref.state_dict())
    assert all(ours.state_dict()[k].shape == v.shape for k, v in ref.state_dict().items())


def test_batch_items_are_independent():
    cfg = TINY["2lvl-L1-attn-top"]
    ours, _ = make_pair(cfg)
    x, ctx, t = torch.randn(3, 4, 8, 8), torch.randn(3, 7, 32), torch.tensor([3, 500, 999])
    with torch.no_grad():
        full = ours(x, t, ctx)
        one = ours(x[1:2], t[1:2], ctx[1:2])
    torch.testing.assert_close(full[1:2], one, rtol=1e-5, atol=1e-5)


def test_gradient_checkpointing_same_output_and_gradients():
    cfg = TINY["sd-pattern-4lvl"]
    ours, _ = make_pair(cfg)
    ours.train()
    g = torch.Generator().manual_seed(2)
    x, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 6, 32, generator=g)
    t = torch.tensor([10, 700])

    calls = {"n": 0}
    resnet = ours.down_blocks[0].resnets[0]
    forward = resnet.forward

    def counting_forward(*args):   # (forward hooks do not fire on checkpoint's recomputation; this does)
        calls["n"] += 1
        return forward(*args)
    resnet.forward = counting_forward

    def run():
        ours.zero_grad()
        xi = x.clone().requires_grad_(True)
        out = ours(xi, t, ctx)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        return out.detach(), xi.grad, {n: p.grad.clone() for n, p in ours.named_parameters()}

    out0, gx0, grads0 = run()
    assert calls["n"] == 1
    ours.enable_gradient_checkpointing()
    out1, gx1, grads1 = run()
    assert calls["n"] == 3   # forward once, then recomputed in the backward: checkpointing really happened
    ours.disable_gradient_checkpointing()
    del resnet.forward

    torch.testing.assert_close(out1, out0, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gx1, gx0, rtol=1e-5, atol=1e-6)
    assert grads0.keys() == grads1.keys() and len(grads0) == len(list(ours.parameters()))
    for n in grads0:
        torch.testing.assert_close(grads1[n], grads0[n], rtol=1e-5, atol=1e-6, msg=n)
    # no grad: checkpointing is skipped, nothing recomputed (on the reference kernels, which the training calls above
    # ran on, so the comparison is of checkpointing alone, not of two kernel families)
    with torch.no_grad(), kernels.use("reference"):
        ours.enable_gradient_checkpointing()
        torch.testing.assert_close(ours(x, t, ctx), out0, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize("name", list(TINY))
def test_config_round_trips(name):
    from diffusers import UNet2DConditionModel
    cfg = TINY[name]
    assert UNetConfig.from_diffusers(cfg.to_diffusers()) == cfg
    model = UNet2DConditionModel(**cfg.to_diffusers())
    assert UNetConfig.from_diffusers(model.config) == cfg          # a FrozenDict with every diffusers key


def test_sd_v14_config():
    cfg = UNetConfig.from_diffusers(SD_V14)
    assert cfg == UNetConfig()                                     # the defaults are SD v1.4
    assert cfg.heads == 8 and cfg.cross_attention == (True, True, True, False) and cfg.cross_attention_dim == 768
    ours = cfg.to_diffusers()
    assert {k: ours[k] for k in SD_V14 if not k.startswith("_d")} == {k: v for k, v in SD_V14.items()
                                                                      if not k.startswith("_d")}


def test_sd_v14_parameter_count_matches_diffusers():
    # counted on the meta device: no 3.4 GB allocation
    from diffusers import UNet2DConditionModel
    with torch.device("meta"):
        ours = UNet(UNetConfig())
        ref = UNet2DConditionModel(**SD_V14)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    assert sum(p.numel() for p in ours.parameters()) == 859_520_964


def test_text_width_1024_alone_is_fine():
    assert UNetConfig.from_diffusers({**SD_V14, "cross_attention_dim": 1024}).cross_attention_dim == 1024


@pytest.mark.parametrize("config, keys", [
    (SD_V21, ["use_linear_projection", "attention_head_dim", "upcast_attention"]),
    (SDXL, ["addition_embed_type", "transformer_layers_per_block", "projection_class_embeddings_input_dim",
            "use_linear_projection", "attention_head_dim"]),
], ids=["sd2.1", "sdxl"])
def test_other_architectures_refused(config, keys):
    with pytest.raises(ValueError) as e:
        UNetConfig.from_diffusers(config)
    for k in keys:
        assert k in str(e.value)


@pytest.mark.parametrize("key, value", [
    ("use_linear_projection", True), ("attention_head_dim", [5, 10, 20, 20]), ("upcast_attention", True),
    ("num_attention_heads", 8), ("transformer_layers_per_block", [1, 2, 2, 2]), ("class_embed_type", "timestep"),
    ("num_class_embeds", 10), ("addition_embed_type", "text"), ("encoder_hid_dim", 512),
    ("dual_cross_attention", True), ("only_cross_attention", True), ("only_cross_attention", [True] * 4),
    ("act_fn", "gelu"), ("center_input_sample", True), ("time_embedding_type", "fourier"),
    ("mid_block_type", "UNetMidBlock2DSimpleCrossAttn"), ("mid_block_type", None), ("conv_in_kernel", 5),
    ("downsample_padding", 0), ("resnet_time_scale_shift", "scale_shift"), ("norm_num_groups", None),
    ("down_block_types", ["AttnDownBlock2D"] * 4), ("up_block_types", ["UpBlock2D"] * 4),
    ("layers_per_block", [1, 2, 2, 2]), ("dropout", 0.1), ("some_future_feature", 3),
])
def test_unsupported_key_refused(key, value):
    with pytest.raises(ValueError, match=key):
        UNetConfig.from_diffusers({**SD_V14, key: value})


def test_other_class_refused():
    with pytest.raises(ValueError, match="_class_name"):
        UNetConfig.from_diffusers({**SD_V14, "_class_name": "UNet2DModel"})


def test_uniform_lists_accepted():
    cfg = UNetConfig.from_diffusers({**SD_V14, "attention_head_dim": [8] * 4, "layers_per_block": [2] * 4,
                                     "transformer_layers_per_block": [1] * 4})
    assert cfg == UNetConfig()


def test_bad_config_errors():
    with pytest.raises(ValueError, match="heads"):
        UNetConfig(block_out_channels=(32, 64), cross_attention=(True, False), heads=3)
    with pytest.raises(ValueError, match="one flag per level"):
        UNetConfig(block_out_channels=(32, 64), cross_attention=(True,))


# ------------------------------------------------------------------------------------------------- full size
@pytest.mark.slow
def test_full_sd_v14_matches_diffusers():
    """SD v1.4's real architecture with random weights: batch 2, 64×64 latents, a 77×768 context, fp32."""
    from diffusers import UNet2DConditionModel
    start = time.time()
    torch.manual_seed(0)
    ref = jitter(UNet2DConditionModel(**SD_V14), 0)
    with torch.device("meta"):
        ours = UNet(UNetConfig.from_diffusers(SD_V14))
    ours.load_state_dict(ref.state_dict(), strict=True, assign=True)   # shares the tensors: no second copy
    ours.eval()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    ref, ours = ref.to(dev), ours.to(dev)
    g = torch.Generator().manual_seed(1)
    x, ctx = torch.randn(2, 4, 64, 64, generator=g).to(dev), torch.randn(2, 77, 768, generator=g).to(dev)
    t = torch.tensor([50, 950], device=dev)
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False   # plain fp32 on GPUs too
    try:
        with torch.no_grad():
            expected = ref(x, t, ctx).sample
            out = ours(x, t, ctx)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    assert_close_rel(out, expected)
    print(f"full-size SD v1.4 U-Net parity on {dev}: {time.time() - start:.0f} s")
