"""LoRA (Hu et al. 2021) on the U-Net's attention projections (and on convolutions, the text encoder): exactly the
base model at step 0, h = W₀x + (α/r)·BAx, merging and the separate file give the model that was trained, it trains,
and fine-tuning with --train lora exports both. The file formats: tests/test_lora_formats.py."""
import copy

import pytest
import torch
from torch import nn

import minidiff
from minidiff import kernels
from minidiff.train import train
from minidiff.lora import (LORA_PRESETS, TARGETS, TEXT_ENCODER_TARGETS, UNET_CONV_TARGETS, UNET_TARGETS, LoRAConv2d,
                           LoRALinear, apply_lora, inject_lora, lora_layers, lora_parameters, merge_lora, read_lora,
                           save_lora)
from tiny_runs import build_tiny_pipe, cfg_for


def _inputs(unet, seed=0):
    g = torch.Generator().manual_seed(seed)
    cfg = unet.config
    return (torch.randn(2, cfg.in_channels, 8, 8, generator=g), torch.tensor([10, 700]),
            torch.randn(2, 77, cfg.cross_attention_dim, generator=g))


def _randomise_b(unet, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_layers(unet).values():
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.1)


def test_step_zero_is_exactly_the_base_model():
    unet = build_tiny_pipe(0).unet
    x = _inputs(unet)
    with torch.no_grad():
        before = unet(*x)
        layers = inject_lora(unet, rank=4, alpha=8)
        after = unet(*x)
    assert torch.equal(before, after)                                 # B = 0  =>  ΔW = 0, bit for bit
    assert all(torch.count_nonzero(m.lora_B.weight) == 0 for m in layers.values())
    assert all(torch.count_nonzero(m.lora_A.weight) > 0 for m in layers.values())


def test_targets_are_the_attention_projections_only():
    unet = build_tiny_pipe(0).unet
    n_attn = sum(1 for name, _ in unet.named_modules() if name.endswith((".attn1", ".attn2")))
    layers = inject_lora(unet, rank=2)
    assert len(layers) == 4 * n_attn
    assert {name.rsplit(".", 1)[-1] if not name.endswith("to_out.0") else "to_out.0" for name in layers} == set(TARGETS)
    trainable = [p for p in unet.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(p) for p in lora_parameters(unet)}
    with pytest.raises(ValueError, match="nothing to put LoRA on"):
        inject_lora(nn.Sequential(nn.GroupNorm(1, 1)), rank=2, targets=("0",))


# LyCORIS' presets as LyCORIS states them (lycoris/config.py PRESET): diffusers / transformers module classes whose
# Linear and Conv2d children get LoRA (k×k convs only with enable_conv), plus layers named outright. "CrossAttention"
# is the class diffusers' attention had when the table was written; it is called Attention now.
LYCORIS = {
    "attn-only": dict(unet=("Attention",), names=(), conv=False, text=("CLIPAttention",)),
    "attn-mlp": dict(unet=("Transformer2DModel",), names=(), conv=False, text=("CLIPAttention", "CLIPMLP")),
    "full": dict(unet=("Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D"), conv=True,
                 names=("conv_in", "conv_out", "time_embedding.linear_1", "time_embedding.linear_2"),
                 text=("CLIPAttention", "CLIPMLP")),
}


def _lycoris_selection(model, classes, names, conv):
    """The module paths LyCORIS' rule picks in a diffusers / transformers model."""
    picked = set()
    for name, module in model.named_modules():
        if type(module).__name__ in classes:
            for child, m in module.named_modules():
                if isinstance(m, nn.Linear) or isinstance(m, nn.Conv2d) and (conv or m.kernel_size == (1, 1)):
                    picked.add(f"{name}.{child}")
        elif name in names:
            picked.add(name)
    return picked


@pytest.mark.parametrize("preset", list(LORA_PRESETS))
def test_presets_put_lora_where_lycoris_does(preset):
    """LORA_PRESETS (minidiff's module names) select, in minidiff's U-Net and text encoder, exactly the layers LyCORIS'
    preset selects by class in diffusers' and transformers' models of the same layout."""
    from sd_fixtures import make_diffusers_pipe
    theirs, ours = make_diffusers_pipe(0), build_tiny_pipe(0)
    rule = LYCORIS[preset]
    want_unet = _lycoris_selection(theirs.unet, rule["unet"], rule["names"], rule["conv"])
    want_text = {p.removeprefix("text_model.")
                 for p in _lycoris_selection(theirs.text_encoder, rule["text"], (), False)}
    assert set(inject_lora(ours.unet, 2, targets=LORA_PRESETS[preset].unet)) == want_unet
    assert set(inject_lora(ours.text_encoder, 2, targets=LORA_PRESETS[preset].text_encoder)) == want_text
    if preset == "full":   # time_emb_proj, the samplers, conv_in/out: the layers downloaded LoCon files touch too
        assert {"down_blocks.0.resnets.0.time_emb_proj", "down_blocks.0.downsamplers.0.conv",
                "up_blocks.0.upsamplers.0.conv", "conv_in", "conv_out"} <= want_unet


def test_conv_rank_and_alpha_go_to_the_kxk_convolutions():
    """kohya's rule: Linear layers and 1×1 convs take (rank, alpha); k×k convs take (conv_rank, conv_alpha), which
    default to rank and alpha (None: α = the layer's own rank)."""
    unet = build_tiny_pipe(0).unet
    layers = inject_lora(unet, 4, 2.0, LORA_PRESETS["full"].unet, conv_rank=2, conv_alpha=1.0)
    for path, m in layers.items():
        kxk = isinstance(m, LoRAConv2d) and m.kernel_size != (1, 1)
        assert (m.rank, m.alpha) == ((2, 1.0) if kxk else (4, 2.0)), path
    assert isinstance(layers["down_blocks.1.resnets.0.conv_shortcut"], LoRAConv2d)      # 1×1: the linear rank
    assert layers["down_blocks.1.resnets.0.conv_shortcut"].rank == 4
    assert layers["conv_in"].rank == 2 and layers["mid_block.resnets.0.time_emb_proj"].rank == 4
    defaults = inject_lora(build_tiny_pipe(0).unet, 3, targets=LORA_PRESETS["full"].unet)
    assert {(m.rank, m.alpha) for m in defaults.values()} == {(3, 3.0)}
    mixed = inject_lora(build_tiny_pipe(0).unet, 4, targets=LORA_PRESETS["full"].unet, conv_rank=2)
    assert {(m.rank, m.alpha) for m in mixed.values()} == {(4, 4.0), (2, 2.0)}           # α = r for each


def test_forward_is_w0x_plus_scaled_bax():
    torch.manual_seed(0)
    base = nn.Linear(6, 5)
    lora = LoRALinear(base, rank=3, alpha=6)
    with torch.no_grad():
        lora.lora_B.weight.normal_()
    x = torch.randn(4, 6)
    A, B, W0, b = lora.lora_A.weight, lora.lora_B.weight, base.weight, base.bias
    expected = x @ W0.T + b + (6 / 3) * (x @ A.T @ B.T)               # W₀x + b + (α/r)·B(Ax)
    torch.testing.assert_close(lora(x), expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(lora.delta_weight(), 2.0 * B @ A, rtol=1e-6, atol=1e-6)


def test_merge_and_the_separate_file_give_the_trained_model(tmp_path):
    pipe = build_tiny_pipe(0)
    base_unet = copy.deepcopy(pipe.unet)
    keys = set(pipe.unet.state_dict())
    inject_lora(pipe.unet, rank=4, alpha=2)
    _randomise_b(pipe.unet)
    x = _inputs(pipe.unet)
    with torch.no_grad():
        wrapped = pipe.unet(*x)
    path = save_lora(pipe.unet, tmp_path / "lora.safetensors")
    tensors, meta = read_lora(path)
    assert meta["rank"] == 4 and meta["alpha"] == 2.0
    assert all(k.startswith("unet.") and k.endswith((".lora_A.weight", ".lora_B.weight")) for k in tensors)

    merge_lora(pipe.unet)
    assert set(pipe.unet.state_dict()) == keys and not lora_layers(pipe.unet)
    with torch.no_grad():
        merged = pipe.unet(*x)
        assert not torch.allclose(wrapped, base_unet(*x), atol=1e-4)   # the LoRA does change the output
    torch.testing.assert_close(merged, wrapped, rtol=1e-5, atol=1e-5)

    applied = apply_lora(copy.deepcopy(base_unet), path, scale=1.0)
    for k, v in pipe.unet.state_dict().items():
        torch.testing.assert_close(applied.state_dict()[k], v, rtol=0, atol=1e-6)
    half = apply_lora(copy.deepcopy(base_unet), path, scale=0.5).state_dict()
    full, base = applied.state_dict(), base_unet.state_dict()
    for k in base:
        torch.testing.assert_close(half[k] - base[k], (full[k] - base[k]) / 2, rtol=0, atol=1e-6)

    with pytest.raises(KeyError, match="no module"):
        apply_lora(nn.Sequential(nn.Linear(2, 2)), path)


def test_locon_and_text_encoder_lora_train():
    """LoRA on convolutions (LoCon) and on the text encoder: exactly the base at step 0, and one backward pass
    reaches every A and B (B first: it starts at 0, so A's gradient is 0 until B moves) and nothing else."""
    pipe = build_tiny_pipe(0)
    x = _inputs(pipe.unet)
    ids = torch.randint(0, 1000, (2, 77), generator=torch.Generator().manual_seed(0))
    # exactly: on the reference kernels (the fast ones stack the Q/K/V matmuls of plain layers, not of wrapped ones,
    # which moves the last bit; tests/test_kernels.py holds wrapped layers on the fast kernels to the tolerance)
    with torch.no_grad(), kernels.use("reference"):
        before = pipe.unet(*x), pipe.text_encoder(ids)
    unet_layers = inject_lora(pipe.unet, rank=2, targets=UNET_TARGETS + UNET_CONV_TARGETS)
    text_layers = inject_lora(pipe.text_encoder, rank=2, targets=TEXT_ENCODER_TARGETS)
    assert any(isinstance(m, LoRAConv2d) and m.base.kernel_size == (3, 3) for m in unet_layers.values())
    assert {p.rsplit(".", 1)[-1] for p in text_layers} == set(TEXT_ENCODER_TARGETS)
    with torch.no_grad(), kernels.use("reference"):
        assert torch.equal(pipe.unet(*x), before[0]) and torch.equal(pipe.text_encoder(ids), before[1])
    pipe.unet.train()
    loss = pipe.unet(x[0], x[1], pipe.text_encoder(ids)).square().mean()
    loss.backward()
    params = lora_parameters(pipe.unet) + lora_parameters(pipe.text_encoder)
    assert all(p.grad is not None for p in params)
    assert all(p.grad.abs().sum() > 0 for m in [*unet_layers.values(), *text_layers.values()]
               for p in [m.lora_B.weight])
    trainable = [p for net in (pipe.unet, pipe.text_encoder) for p in net.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(p) for p in params}


def test_forward_takes_a_residual():
    """forward(x, add=r) = base(x) + ΔW x + r: what minidiff.nn.Linear's callers pass to output projections."""
    lora = LoRALinear(nn.Linear(6, 5), rank=2)
    with torch.no_grad():
        lora.lora_B.weight.normal_()
    x, r = torch.randn(3, 6), torch.randn(3, 5)
    torch.testing.assert_close(lora(x, add=r), lora(x) + r)


def test_finetune_lora_exports_merged_and_separate(tiny, tmp_path):
    out = tmp_path / "out"
    train(cfg_for(tiny, out, steps=3, train="lora", lora_preset="attn-only", lora_rank=2, lora_alpha=4,
                  lora_export="separate", lr=1e-2))
    tuned, base = minidiff.load(out), minidiff.load(tiny["model"])
    t, b = tuned.unet.state_dict(), base.unet.state_dict()
    changed = {k for k in b if not torch.equal(t[k], b[k])}
    assert changed and all(k.endswith(tuple(f"{n}.weight" for n in TARGETS)) for k in changed)
    apply_lora(base, out / "lora.safetensors")
    for k, v in base.unet.state_dict().items():
        torch.testing.assert_close(v, t[k], rtol=0, atol=1e-6)
    assert read_lora(out / "lora.safetensors")[1]["base_model"] == tiny["model"]
    assert all(torch.equal(v, base.text_encoder.state_dict()[k]) for k, v in tuned.text_encoder.state_dict().items())
    # --lora-text-encoder: the text encoder's LoRA trains too, and is in the merged model and in the file
    train(cfg_for(tiny, tmp_path / "te", steps=3, train="lora", lora_preset="attn-mlp", lora_rank=2,
                  lora_text_encoder=True, lora_export="separate", lr=1e-2))
    tuned, base = minidiff.load(tmp_path / "te"), minidiff.load(tiny["model"])
    t, b = tuned.text_encoder.state_dict(), base.text_encoder.state_dict()
    changed = {k for k in b if not torch.equal(t[k], b[k])}
    assert changed and all(k.endswith(tuple(f"{n}.weight" for n in TEXT_ENCODER_TARGETS)) for k in changed)
    apply_lora(base, tmp_path / "te" / "lora.safetensors")
    for net, ref in [(base.unet, tuned.unet), (base.text_encoder, tuned.text_encoder)]:
        for k, v in net.state_dict().items():
            torch.testing.assert_close(v, ref.state_dict()[k], rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match=r"lora_text_encoder \(--lora-text-encoder\) needs train='lora'"):
        cfg_for(tiny, tmp_path / "x", lora_text_encoder=True)
    # merge (the default) writes no separate file
    train(cfg_for(tiny, tmp_path / "merged", steps=1, train="lora", lora_rank=2))
    assert not (tmp_path / "merged" / "lora.safetensors").exists()
