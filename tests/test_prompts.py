"""Long prompts and (word:1.3) weighting (minidiff.prompts) against embeddings built by hand in each test: transformers'
tokenizer and CLIP text encoder (the oracle) plus the tensor math of AUTOMATIC1111's rules written out —
75-token chunks framed with <start>/<end>, encoded separately, concatenated; weights scale the encoder's output
vectors, then each chunk is rescaled to its original mean."""
import pytest
import torch

import minidiff
from minidiff import prompts
from sd_fixtures import make_diffusers_pipe, write_diffusers


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(minidiff pipe, transformers tokenizer, transformers text encoder) with the same weights."""
    dpipe = make_diffusers_pipe(0)
    pipe = minidiff.load(write_diffusers(dpipe, tmp_path_factory.mktemp("sd") / "sd"))
    return pipe, dpipe.tokenizer, dpipe.text_encoder


def hf_ids(tok, text):
    return tok(text, add_special_tokens=False).input_ids


def framed(tok, part):
    """<start> + up to 75 ids + <end>, padded with <end> to 77."""
    return [tok.bos_token_id] + part + [tok.eos_token_id] * (76 - len(part))


@torch.no_grad()
def hf_encode(enc, rows):
    return enc(torch.tensor(rows))[0]          # [k, 77, d]


def ours(pipe, texts, **kw):
    return prompts.encode(pipe.tokenizer, pipe.text_encoder, texts, **kw)


# ------------------------------------------------------------------------------------------------- the syntax
@pytest.mark.parametrize("text,expected", [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [("a ", 1.0), ("house", 1.1 * 1.1 * 1.3), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
      (", sun, ", 1.1), ("sky", 1.1 ** 4), (".", 1.1)]),
    ("[[word]] x", [("word", 1 / 1.1 ** 2), (" x", 1.0)]),
    ("(two words: 0.8 ) and", [("two words", 0.8), (" and", 1.0)]),
    ("ratio 16:9", [("ratio 16:9", 1.0)]),
    ("stray ) and ]", [("stray ) and ]", 1.0)]),
    ("", [("", 1.0)]),
], ids=["plain", "round", "unbalanced", "escaped", "merged", "a1111-docstring", "square", "explicit", "colon",
        "stray", "empty"])
def test_parse_prompt_attention(text, expected):
    """The examples of A1111's parse_prompt_attention docstring (and a few more cases of its grammar)."""
    got = prompts.parse_prompt_attention(text)
    assert [t for t, _ in got] == [t for t, _ in expected]
    assert [w for _, w in got] == pytest.approx([w for _, w in expected])


def test_bad_weight_is_named():
    with pytest.raises(ValueError, match=r"prompt weight '1\.2\.3' is not a number"):
        prompts.parse_prompt_attention("(x:1.2.3)")


# ------------------------------------------------------------------------------------- embeddings by hand
def test_short_plain_prompt_is_diffusers_context(models):
    """Up to 75 tokens and no brackets: exactly the [77, d] context diffusers' pipeline encodes."""
    pipe, tok, enc = models
    texts = ["a toucan", "A Pokémon cellphone", ""]
    ref = hf_encode(enc, tok(texts, padding="max_length", max_length=77).input_ids)
    got = torch.stack(ours(pipe, texts))
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_weighted_prompt_by_hand(models):
    """'a (red:1.5) [circle] on grey': each piece tokenized on its own; z ⊙ w, then × mean(z) / mean(z ⊙ w)."""
    pipe, tok, enc = models
    pieces = [("a ", 1.0), ("red", 1.5), (" ", 1.0), ("circle", 1 / 1.1), (" on grey", 1.0)]
    ids, w = [], []
    for text, weight in pieces:
        t = hf_ids(tok, text)
        ids += t
        w += [weight] * len(t)
    z = hf_encode(enc, [framed(tok, ids)])[0]                                     # [77, d]
    weights = torch.tensor([1.0] + w + [1.0] * (76 - len(w)))                     # [77]
    expected = z * weights[:, None]
    expected = expected * (z.mean() / expected.mean())
    got, = ours(pipe, ["a (red:1.5) [circle] on grey"])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert got.mean().item() == pytest.approx(z.mean().item(), rel=1e-5)
    assert not torch.allclose(got, z, atol=1e-3)
    plain, = ours(pipe, ["a (red:1.5) [circle] on grey"], weighting=False)       # brackets read as text
    literal = hf_encode(enc, [framed(tok, hf_ids(tok, "a (red:1.5) [circle] on grey"))])[0]
    torch.testing.assert_close(plain, literal, rtol=1e-5, atol=1e-5)


def test_long_prompt_is_framed_chunks_concatenated(models):
    """A 160-token prompt: 3 chunks of <start> + 75 (+ 75, + 10) tokens + <end>, each encoded alone -> [3·77, d]."""
    pipe, tok, enc = models
    text = " ".join(["a very long prompt"] * 40)
    ids = hf_ids(tok, text)
    assert len(ids) == 160
    rows = [framed(tok, ids[i:i + 75]) for i in (0, 75, 150)]
    expected = hf_encode(enc, rows).reshape(3 * 77, -1)                           # [3, 77, d] -> [231, d]
    got, = ours(pipe, [text])
    assert got.shape == (231, enc.config.hidden_size)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_long_weighted_prompt_restores_each_chunks_mean(models):
    """Weights in a later chunk: that chunk alone is scaled and rescaled; the first chunk is untouched."""
    pipe, tok, enc = models
    head = " ".join(["a very long prompt"] * 20)                                  # 80 tokens
    ids_head, ids_word = hf_ids(tok, head + " "), hf_ids(tok, "toucan")
    rows = [framed(tok, ids_head[:75]), framed(tok, ids_head[75:] + ids_word)]
    z = hf_encode(enc, rows)                                                      # [2, 77, d]
    w = torch.ones(2, 77)
    w[1, 1 + len(ids_head) - 75:1 + len(ids_head) - 75 + len(ids_word)] = 2.0
    expected = z * w[..., None]
    expected[1] = expected[1] * (z[1].mean() / expected[1].mean())
    got, = ours(pipe, [head + " (toucan:2)"])
    torch.testing.assert_close(got, expected.reshape(154, -1), rtol=1e-5, atol=1e-5)


def test_batch_is_padded_with_the_empty_prompt(models):
    """encode_batch: the shorter contexts get the context of "" appended, chunk by chunk (A1111's cond/uncond rule)."""
    pipe, tok, enc = models
    long = " ".join(["a very long prompt"] * 20)                                   # 80 tokens: 2 chunks
    ids = hf_ids(tok, long)
    short_ids = hf_ids(tok, "blurry")
    with torch.no_grad():
        z_long = hf_encode(enc, [framed(tok, ids[:75]), framed(tok, ids[75:])]).reshape(154, -1)
        z_short = hf_encode(enc, [framed(tok, short_ids), framed(tok, [])]).reshape(154, -1)
    got = prompts.encode_batch(pipe.tokenizer, pipe.text_encoder, [long, "blurry"])
    assert got.shape == (2, 154, enc.config.hidden_size)
    torch.testing.assert_close(got, torch.stack([z_long, z_short]), rtol=1e-5, atol=1e-5)
    fixed = prompts.encode_batch(pipe.tokenizer, pipe.text_encoder, ["blurry"], length=3 * 77)
    assert fixed.shape == (1, 231, enc.config.hidden_size)
    with pytest.raises(ValueError, match="cannot be padded"):
        prompts.encode_batch(pipe.tokenizer, pipe.text_encoder, [long], length=77)


def test_generate_never_truncates_but_the_tokenizer_warns(models):
    pipe, _, _ = models
    text = " ".join(["a very long prompt"] * 40)
    with pytest.warns(UserWarning, match="has 160 tokens but only 75 fit: the last 85 tokens were dropped"):
        pipe.tokenizer([text])
    assert pipe.encode_prompt([text]).shape[1] == 3 * 77
