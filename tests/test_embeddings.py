"""Textual-inversion embeddings: every common file loads into minidiff and gives the image diffusers'
load_textual_inversion gives (single and multi-vector, the word in the prompt and in the negative prompt); the
tokenizer's added tokens match transformers'; what save_embedding writes, diffusers reads; bad input is refused."""
import pytest
import torch
from safetensors.torch import save_file

import minidiff
from interop_helpers import TOL, base_pair, load_diffusers, ours, shared_folder, theirs
from minidiff.formats.embeddings import EmbeddingError, read_embedding, save_embedding
from minidiff.tokenizer import CLIPTokenizer
from sd_fixtures import VOCAB

D = 64  # the tiny text encoder's width


@pytest.fixture(scope="module")
def folder():
    return shared_folder()


def _vectors(n, seed=0):
    return torch.randn(n, D, generator=torch.Generator().manual_seed(seed))


def _files(tmp_path):
    """The layouts in the wild, written by hand: (path, the token minidiff should find, token= diffusers needs)."""
    v1, v3, v2 = _vectors(1, 1)[0], _vectors(3, 2), _vectors(2, 3)
    save_file({"<cat-toy>": v1}, str(tmp_path / "learned_embeds.safetensors"))            # diffusers, [768]
    (tmp_path / "bin").mkdir()
    torch.save({"<toy-2>": v2}, tmp_path / "bin" / "learned_embeds.bin")                  # diffusers .bin, [n, 768]
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": v3.clone().requires_grad_()},
                "name": "wlop-style", "step": 4999, "sd_checkpoint": "7460a6fa",
                "sd_checkpoint_name": "sd-v1-4"}, tmp_path / "wlop.pt")                    # A1111 .pt, 3 vectors
    save_file({"emb_params": v2 * 2}, str(tmp_path / "bad-hands.safetensors"))            # A1111/kohya .safetensors
    return [(tmp_path / "learned_embeds.safetensors", "<cat-toy>", None),
            (tmp_path / "bin" / "learned_embeds.bin", "<toy-2>", None),
            (tmp_path / "wlop.pt", "wlop-style", None),
            (tmp_path / "bad-hands.safetensors", "bad-hands", "bad-hands")]  # diffusers would call it "emb_params"


def test_embeddings_give_diffusers_image(folder, tmp_path):
    pipe, dpipe = base_pair(folder)
    files = _files(tmp_path)
    for path, token, diffusers_token in files:
        added = pipe.load_embedding(path)
        assert added[0] == token
        dpipe.load_textual_inversion(str(path), token=diffusers_token)
    assert pipe.load_embedding.__doc__ and len(added) == 2 and added[1] == "bad-hands_1"
    base = ours(minidiff.load(folder), "a wlop-style portrait of a <cat-toy>", "<toy-2>, bad-hands")
    for prompt, negative in [("a <cat-toy> on a table", None),                       # one vector
                             ("a wlop-style portrait of a <cat-toy>", "<toy-2>, bad-hands")]:  # multi, in negative too
        image = ours(pipe, prompt, negative)
        torch.testing.assert_close(image, theirs(dpipe, prompt, negative), **TOL)
    assert (image - base).abs().max() > 0.05   # the words change the image
    torch.testing.assert_close(ours(pipe, prompt, negative, fast=False), image, **TOL)


def test_token_override_and_writer_read_by_diffusers(folder, tmp_path):
    """save_embedding's files (what the textual-inversion trainer writes) load in diffusers; token= renames."""
    v = _vectors(2, 5)
    d_file = save_embedding(tmp_path / "learned_embeds.safetensors", "<pika>", v)
    a_file = save_embedding(tmp_path / "pika.pt", "<pika>", v, format="a1111")
    s_file = save_embedding(tmp_path / "pika.safetensors", "<pika>", v, format="a1111")
    assert torch.load(a_file, weights_only=True)["name"] == "<pika>"
    for f in (d_file, a_file):
        token, vectors = read_embedding(f)
        assert token == "<pika>" and torch.equal(vectors, v)
    assert read_embedding(s_file, token="<other>")[0] == "<other>"

    pipe, dpipe = base_pair(folder)
    assert pipe.load_embedding(a_file, token="<mon>") == ["<mon>", "<mon>_1"]
    dpipe.load_textual_inversion(str(d_file), token="<mon>")
    prompt = "a <mon> in a field"
    torch.testing.assert_close(ours(pipe, prompt), theirs(dpipe, prompt), **TOL)


def test_saved_model_keeps_the_word(folder, tmp_path):
    """minidiff.save of a model with an embedding: the tokenizer keeps the word (tokenizer_config.json's
    added_tokens_decoder), so diffusers' from_pretrained and minidiff.load give the same image with it."""
    pipe = minidiff.load(folder)
    save_file({"<cat-toy>": _vectors(1, 1)[0]}, str(tmp_path / "e.safetensors"))
    pipe.load_embedding(tmp_path / "e.safetensors")
    minidiff.save(pipe, tmp_path / "out")
    prompt = "a <cat-toy> on a table"
    image = ours(pipe, prompt)
    torch.testing.assert_close(ours(minidiff.load(tmp_path / "out"), prompt), image, **TOL)
    torch.testing.assert_close(theirs(load_diffusers(tmp_path / "out"), prompt), image, **TOL)


# ---------------------------------------------------------------------------------------------- the primitives
def test_add_tokens_match_transformers(tmp_path):
    from transformers import CLIPTokenizer as HFTokenizer
    ours_tok = CLIPTokenizer(VOCAB)
    ref = HFTokenizer(str(VOCAB / "vocab.json"), str(VOCAB / "merges.txt"))
    new = ["<cat-toy>", "<cat-toy>_1", "sks-dog"]
    ids = ours_tok.add_tokens(new)
    ref.add_tokens(new)
    assert ids == [49408, 49409, 49410] == ref.convert_tokens_to_ids(new)
    for text in ["a <cat-toy> on a table", "A <Cat-Toy>s", "two <cat-toy>_1x and a sks-dog", "plain words"]:
        assert ours_tok(text).tolist() == [ref(text, padding="max_length", max_length=77).input_ids], text
    assert ours_tok.expand_multi_vector("a <cat-toy>, <cat-toy>") == "a <cat-toy> <cat-toy>_1, <cat-toy> <cat-toy>_1"
    ours_tok.save(tmp_path / "tok")
    again = CLIPTokenizer(tmp_path / "tok")
    assert again.added_tokens == {"<cat-toy>": 49408, "<cat-toy>_1": 49409, "sks-dog": 49410}
    assert HFTokenizer.from_pretrained(str(tmp_path / "tok")).convert_tokens_to_ids(new) == ids


def test_add_tokens_refuses_known_words():
    tok = CLIPTokenizer(VOCAB)
    for word in ["cat", "cat</w>", "<|endoftext|>"]:
        with pytest.raises(ValueError, match=f"'{word}' is already in the tokenizer's vocabulary"):
            tok.add_tokens(["<new>", word])
    assert tok.added_tokens == {}                     # nothing was added by the refused calls
    tok.add_tokens(["<new>"])
    with pytest.raises(ValueError, match="'<new>' is already"):
        tok.add_tokens(["<new>"])
    with pytest.raises(ValueError, match="given twice"):
        tok.add_tokens(["<a>", "<a>"])


def test_add_token_embeddings_keeps_old_rows(folder):
    te = minidiff.load(folder).text_encoder
    old = te.embeddings.token_embedding.weight.clone()
    te.add_token_embeddings(_vectors(2))
    w = te.embeddings.token_embedding.weight
    assert w.shape == (49410, D) and te.config.vocab_size == 49410
    assert torch.equal(w[:49408], old) and torch.equal(w[49408:], _vectors(2))
    with pytest.raises(ValueError, match=r"vectors must be \[n, 64\]"):
        te.add_token_embeddings(torch.zeros(1, 768))


# ---------------------------------------------------------------------------------------------- bad input
class Param(torch.nn.Module):
    pass


def test_bad_embeddings(folder, tmp_path):
    pipe = minidiff.load(folder)
    save_file({"cat": _vectors(1)[0]}, str(tmp_path / "cat.safetensors"))
    with pytest.raises(ValueError, match="'cat' is already in the tokenizer's vocabulary"):
        pipe.load_embedding(tmp_path / "cat.safetensors")
    pipe.load_embedding(tmp_path / "cat.safetensors", token="<kitty>")
    with pytest.raises(ValueError, match="'<kitty>' is already"):      # loading the same word twice
        pipe.load_embedding(tmp_path / "cat.safetensors", token="<kitty>")
    save_file({"<big>": torch.zeros(768)}, str(tmp_path / "sd1.safetensors"))
    with pytest.raises(EmbeddingError, match="width 768, this text encoder's are 64"):
        pipe.load_embedding(tmp_path / "sd1.safetensors")
    save_file({"clip_l": torch.zeros(1, 768), "clip_g": torch.zeros(1, 1280)}, str(tmp_path / "xl.safetensors"))
    with pytest.raises(EmbeddingError, match="SDXL"):
        pipe.load_embedding(tmp_path / "xl.safetensors")
    torch.save(_vectors(1)[0], tmp_path / "bare.pt")
    with pytest.raises(EmbeddingError, match="names no token; pass token="):
        pipe.load_embedding(tmp_path / "bare.pt")
    torch.save({"string_to_param": Param(), "name": "x"}, tmp_path / "module.pt")
    with pytest.raises(EmbeddingError, match="holds more than tensors.*module.pt|module.pt.*holds more than tensors"):
        pipe.load_embedding(tmp_path / "module.pt")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(EmbeddingError, match="unknown embedding file type"):
        pipe.load_embedding(tmp_path / "notes.txt")
