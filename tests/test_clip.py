"""minidiff.clip against transformers' CLIPTextModel / CLIPVisionModel / CLIPModel (random weights), plus the loss."""
import math

import pytest
import torch

from minidiff.clip import (CLIPImageConfig, CLIPImageEncoder, CLIPModel, CLIPTextConfig, CLIPTextTransformer,
                           clip_loss, multi_positive_infonce, zero_shot_classify)
from minidiff.nn import attention_impl

transformers = pytest.importorskip("transformers")
from transformers.models.clip import modeling_clip  # noqa: E402

TINY = CLIPTextConfig(vocab_size=1000, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                      max_position_embeddings=77, pad_token_id=1, bos_token_id=998, eos_token_id=999)
# SD v1's head layout (width 768, 12 heads of 64, MLP 3072, the full vocabulary) cut to 2 layers, with SD v1.4's own
# legacy eos_token_id = 2 (transformers then pools at the largest id)
SD_LAYOUT = CLIPTextConfig(num_hidden_layers=2, pad_token_id=1, bos_token_id=0, eos_token_id=2)
# text_encoder/config.json of the SD v1.4 release, as published
SD14_TEXT_CONFIG = {
    "_name_or_path": "openai/clip-vit-large-patch14", "architectures": ["CLIPTextModel"], "attention_dropout": 0.0,
    "bos_token_id": 0, "dropout": 0.0, "eos_token_id": 2, "hidden_act": "quick_gelu", "hidden_size": 768,
    "initializer_factor": 1.0, "initializer_range": 0.02, "intermediate_size": 3072, "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77, "model_type": "clip_text_model", "num_attention_heads": 12,
    "num_hidden_layers": 12, "pad_token_id": 1, "projection_dim": 768, "torch_dtype": "float32",
    "transformers_version": "4.22.0.dev0", "vocab_size": 49408,
}


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def _hf_config(cls, cfg):
    c = cls(**cfg.to_transformers())
    c._attn_implementation = "eager"  # the reference: transformers' softmax(QKᵀ·scale) written out
    return c


def test_configs_round_trip():
    sd = CLIPTextConfig.from_transformers(SD14_TEXT_CONFIG)
    assert sd == CLIPTextConfig(bos_token_id=0, eos_token_id=2)  # SD's shape is the default
    for cfg, hf_cls in ((sd, transformers.CLIPTextConfig), (TINY, transformers.CLIPTextConfig),
                        (CLIPImageConfig(), transformers.CLIPVisionConfig)):
        d = cfg.to_transformers()
        hf = hf_cls(**d)
        assert type(cfg).from_transformers(hf.to_dict()) == cfg
        assert d["model_type"] == hf.model_type and len(d["architectures"]) == 1
    assert CLIPTextConfig.to_transformers(sd)["architectures"] == ["CLIPTextModel"]
    full = transformers.CLIPConfig(text_config=TINY.to_transformers(), vision_config=CLIPImageConfig().to_transformers())
    assert CLIPTextConfig.from_transformers(full.to_dict()) == TINY
    assert CLIPImageConfig.from_transformers(full.to_dict()) == CLIPImageConfig()
    with pytest.raises(ValueError, match="hidden_act"):
        CLIPTextConfig.from_transformers({**SD14_TEXT_CONFIG, "hidden_act": "relu"})


@pytest.fixture(scope="module", params=["tiny", "sd_layout"])
def text_pair(request):
    cfg = TINY if request.param == "tiny" else SD_LAYOUT
    torch.manual_seed(0)
    hf = transformers.CLIPTextModel(_hf_config(transformers.CLIPTextConfig, cfg)).eval()
    ours = CLIPTextTransformer(cfg).eval()
    ours.load_state_dict(hf.state_dict(), strict=True)  # the same names, no text_model. prefix
    if request.param == "tiny":
        ids = torch.randint(0, 998, (3, 77))
        for row, n in enumerate((5, 30, 76)):  # <|endoftext|> then padding with it: the FIRST one is pooled
            ids[row, 0], ids[row, n:] = cfg.bos_token_id, cfg.eos_token_id
    else:
        from minidiff.tokenizer import CLIPTokenizer
        ids = CLIPTokenizer()(["A Pokémon cellphone", "A mix of Pikachu and Rayquaza " * 20])  # [2, 77]
    return request.param, hf, ours, ids


def test_text_transformer_matches_transformers(text_pair):
    name, hf, ours, ids = text_pair
    assert set(ours.state_dict()) == set(hf.state_dict())
    with torch.no_grad():
        ref = hf(ids)
        for impl in ("naive", "sdpa"):
            with attention_impl(impl):
                h = ours(ids)
            pooled = ours.pooled(ids, last_hidden_state=h)
            assert h.shape == ref.last_hidden_state.shape == (ids.shape[0], ids.shape[1], ours.config.hidden_size)
            assert rel_err(h, ref.last_hidden_state) < 1e-4, (name, impl)
            assert rel_err(pooled, ref.pooler_output) < 1e-4, (name, impl)
        if name == "sd_layout":  # keep the big one quick; the masked path is the same code at any width
            return
        assert torch.equal(ours.pooled(ids), pooled)
        # a padding mask on top of the causal one
        mask = torch.ones_like(ids)
        mask[:, 20:] = 0
        ref = hf(ids, attention_mask=mask)
        for impl in ("naive", "sdpa"):
            with attention_impl(impl):
                assert rel_err(ours(ids, mask), ref.last_hidden_state) < 1e-4, (name, impl)


def test_text_transformer_is_causal():
    ours = CLIPTextTransformer(TINY).eval()
    ids = torch.randint(0, 998, (2, 16))
    changed = ids.clone()
    changed[:, 10] = (ids[:, 10] + 1) % 998
    with torch.no_grad():
        a, b = ours(ids), ours(changed)
    assert torch.equal(a[:, :10], b[:, :10])           # nothing before position 10 sees the change
    assert (a[:, 10:] - b[:, 10:]).abs().amax() > 1e-3  # everything from 10 on does
    with pytest.raises(ValueError, match="positions"):
        ours(torch.zeros(1, 78, dtype=torch.long))


def test_image_encoder_matches_transformers():
    cfg = CLIPImageConfig(image_size=32, patch_size=8, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                          num_attention_heads=3)
    hf = transformers.CLIPVisionModel(_hf_config(transformers.CLIPVisionConfig, cfg)).eval()
    ours = CLIPImageEncoder(cfg).eval()
    ours.load_state_dict(hf.state_dict(), strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = hf(x)
        for impl in ("naive", "sdpa"):
            with attention_impl(impl):
                assert ours.tokens(x).shape == (2, 1 + 16, 48)
                assert rel_err(ours.tokens(x), ref.last_hidden_state) < 1e-4
                assert rel_err(ours(x), ref.pooler_output) < 1e-4
    with pytest.raises(ValueError, match="built for 32"):
        ours(torch.randn(1, 3, 16, 16))


def test_clip_model_matches_transformers():
    tc, ic = TINY, CLIPImageConfig(hidden_size=32, intermediate_size=64, num_attention_heads=2)
    hc = transformers.CLIPConfig(text_config=tc.to_transformers(), vision_config=ic.to_transformers(), projection_dim=24)
    hc._attn_implementation = "eager"
    hf = transformers.CLIPModel(hc).eval()
    ours = CLIPModel(tc, ic, embed_dim=24).eval()
    assert abs(ours.logit_scale.item() - math.log(1 / 0.07)) < 1e-6
    assert abs(ours.logit_scale.item() - hf.logit_scale.item()) < 1e-4  # transformers' default init, 2.6592
    ours.load_state_dict(hf.state_dict(), strict=True)
    ids = torch.randint(0, 998, (4, 12))
    ids[:, 0], ids[:, 9:] = tc.bos_token_id, tc.eos_token_id
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        ref = hf(input_ids=ids, pixel_values=x, return_loss=True)
        assert rel_err(ours.encode_text(ids), ref.text_embeds) < 1e-4
        assert rel_err(ours.encode_image(x), ref.image_embeds) < 1e-4
        assert rel_err(ours.logits(ids, x), ref.logits_per_text) < 1e-4
        assert abs(ours(ids, x).item() - ref.loss.item()) < 1e-4 * ref.loss.item()


def test_clip_loss_equals_transformers():
    hf_loss = getattr(modeling_clip, "clip_loss", None) or modeling_clip.image_text_contrastive_loss
    for n in (1, 3, 8):
        logits = torch.randn(n, n) * 5
        assert torch.allclose(clip_loss(logits), hf_loss(logits), rtol=1e-6, atol=1e-7)


def test_multi_positive_infonce_is_clip_loss_for_distinct_captions():
    logits = torch.randn(6, 6) * 3
    assert torch.allclose(multi_positive_infonce(logits, torch.arange(6)), clip_loss(logits), rtol=1e-6)


def test_multi_positive_infonce_spreads_the_target_over_repeated_captions():
    torch.manual_seed(1)
    logits = torch.randn(5, 5) * 2
    labels = torch.tensor([0, 1, 0, 2, 1])
    # by hand: row i's target is uniform over the j with the same caption, in both directions
    lt, li = torch.log_softmax(logits, dim=1), torch.log_softmax(logits.t(), dim=1)
    want = 0.0
    for i in range(5):
        pos = [j for j in range(5) if labels[j] == labels[i]]
        want += -sum(lt[i, j] for j in pos) / len(pos) - sum(li[i, j] for j in pos) / len(pos)
    want = want / (2 * 5)
    assert torch.allclose(multi_positive_infonce(logits, labels), want, rtol=1e-5)


def test_aligned_pairs_score_lower_than_shuffled():
    t = torch.nn.functional.normalize(torch.randn(8, 16), dim=-1)
    v = torch.nn.functional.normalize(t + 0.1 * torch.randn(8, 16), dim=-1)  # image i ≈ caption i
    scale = 1 / 0.07
    aligned = clip_loss(scale * t @ v.t())
    shuffled = clip_loss(scale * t @ v[torch.randperm(8)].t())
    assert aligned < 0.1 < 1.0 < shuffled


def test_training_on_a_toy_set_reduces_the_loss():
    """4 colours, one caption token each: 30 Adam steps take the loss from ~log 4 to nearly 0 (about 2 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: threads only add overhead, and the CI box is shared
    try:
        torch.manual_seed(0)
        rgb = torch.tensor([(1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 1, 0)], dtype=torch.float32)
        ids = torch.tensor([[5, c, 6, 6] for c in range(4)])  # <bos> colour <eos> <pad>, vocabulary of 8
        g = torch.Generator().manual_seed(0)

        def images():  # [4, 3, 16, 16]: flat colour in [-1, 1] plus noise
            x = rgb[:, :, None, None].expand(-1, -1, 16, 16) * 2 - 1
            return x + 0.5 * torch.randn(x.shape, generator=g)

        tc = CLIPTextConfig(vocab_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                            num_attention_heads=2, max_position_embeddings=4, bos_token_id=5, eos_token_id=6,
                            pad_token_id=6)
        ic = CLIPImageConfig(image_size=16, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                             num_attention_heads=2)
        model = CLIPModel(tc, ic, embed_dim=16)
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        losses = []
        for _ in range(30):
            loss = model(ids, images())
            opt.zero_grad()
            loss.backward()
            opt.step()
            model.logit_scale.data.clamp_(max=math.log(100))
            losses.append(loss.item())
        assert losses[0] > 1.0            # untrained: near chance, log 4 = 1.39
        assert losses[-1] < 0.05          # trained: the true pairs dominate
        assert sum(losses[-5:]) < sum(losses[:5]) / 20

        def tokenizer(prompts, max_length):  # a stand-in: "red" -> [5, 0, 6, 6], ...
            return torch.tensor([[5, ["red", "green", "blue", "yellow"].index(p.split()[1]), 6, 6] for p in prompts])

        probs = zero_shot_classify(model, tokenizer, images(), ["a red square", "a green square", "a blue square",
                                                                "a yellow square"])
        assert probs.shape == (4, 4) and torch.allclose(probs.sum(-1), torch.ones(4))
        assert probs.argmax(-1).tolist() == [0, 1, 2, 3]
    finally:
        torch.set_num_threads(threads)
