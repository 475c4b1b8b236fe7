"""Textual inversion (`minidiff finetune --train textual-inversion`): only the new word's vectors train, the files it
writes are the ones diffusers and AUTOMATIC1111 read, and `pipe.load_embedding` gives the text encoder output that
diffusers' `load_textual_inversion` gives."""
import json

import pytest
import torch
from safetensors.torch import load_file

import minidiff
from minidiff.formats.embeddings import read_embedding, save_embedding
from minidiff.train import train
from tiny_runs import cfg_for, write_tiny_dataset


@pytest.fixture(scope="module")
def ti_data(tmp_path_factory):
    folder = write_tiny_dataset(tmp_path_factory.mktemp("ti") / "data")
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    (folder / "metadata.jsonl").write_text("".join(json.dumps({**r, "text": f"a picture of <thing> {i}"}) + "\n"
                                                   for i, r in enumerate(rows)))
    return str(folder)


def ti_cfg(tiny, ti_data, out, **kw):
    return cfg_for({**tiny, "data": ti_data}, out, train="textual-inversion", placeholder_token="<thing>",
                   initializer_token="thing", lr=5e-2, **kw)


@pytest.mark.parametrize("n", [1, 2])
def test_only_the_new_word_trains_and_the_files_are_written(tiny, ti_data, tmp_path, n):
    out = tmp_path / "out"
    train(ti_cfg(tiny, ti_data, out, steps=3, num_vectors=n, validation_prompts=None))   # default validation: on
    base, tuned = minidiff.load(tiny["model"]), minidiff.load(out)
    for part in ("unet", "vae", "text_encoder"):                          # the model folder is the base, bit for bit
        b = getattr(base, part).state_dict()
        for k, v in getattr(tuned, part).state_dict().items():
            assert torch.equal(v, b[k]), (part, k)
    ckpt = load_file(str(out / "checkpoints" / "step-000003" / "trainable.safetensors"))
    assert list(ckpt) == ["text_encoder.embeddings.token_embedding.learned"]
    d = base.text_encoder.config.hidden_size
    learned = load_file(str(out / "learned_embeds.safetensors"))["<thing>"]
    assert learned.shape == ((d,) if n == 1 else (n, d))
    assert torch.equal(learned.reshape(n, d), ckpt["text_encoder.embeddings.token_embedding.learned"])
    init = base.text_encoder.embeddings.token_embedding.weight[base.tokenizer.encode("thing")[1]]
    assert all(not torch.equal(row, init) for row in learned.reshape(n, d))   # it moved from the initializer
    for f in ("thing.pt", "thing.safetensors"):                           # AUTOMATIC1111's two forms, same vectors
        token, vectors = read_embedding(out / f)
        assert torch.equal(vectors, learned.reshape(n, d))
    assert read_embedding(out / "thing.pt")[0] == "<thing>"
    assert (out / "validation" / "step-000003.png").is_file()


def test_resume_continues_the_embedding(tiny, ti_data, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    train(ti_cfg(tiny, ti_data, a, steps=4, checkpoint_every=2))
    train(ti_cfg(tiny, ti_data, b, steps=4, checkpoint_every=2, max_steps_this_run=3))
    train(ti_cfg(tiny, ti_data, b, steps=4, checkpoint_every=2, resume=True))
    assert torch.equal(load_file(str(a / "learned_embeds.safetensors"))["<thing>"],
                       load_file(str(b / "learned_embeds.safetensors"))["<thing>"])


def test_bad_words_are_clear_errors(tiny, ti_data, tmp_path):
    with pytest.raises(ValueError, match=r"--placeholder-token 'thing': token 'thing' is already in the tokenizer's vocabulary"):
        train(cfg_for({**tiny, "data": ti_data}, tmp_path / "a", train="textual-inversion",
                      placeholder_token="thing", initializer_token="picture"))
    with pytest.raises(ValueError, match=r"--initializer-token must be one token.*'a picture' is 2 tokens"):
        train(cfg_for({**tiny, "data": ti_data}, tmp_path / "b", train="textual-inversion",
                      placeholder_token="<new>", initializer_token="a picture"))
    with pytest.raises(ValueError, match="--placeholder-token"):
        cfg_for(tiny, tmp_path / "c", train="textual-inversion")


@pytest.mark.parametrize("n", [1, 2])
def test_load_embedding_matches_diffusers_load_textual_inversion(tiny, tmp_path, n):
    """A diffusers-format file made here: diffusers loads it, and the prompt's text-encoder output is diffusers'."""
    from diffusers import StableDiffusionPipeline
    g = torch.Generator().manual_seed(0)
    d = minidiff.load(tiny["model"]).text_encoder.config.hidden_size
    vectors = torch.randn(n, d, generator=g) * 0.1
    path = save_embedding(tmp_path / "learned_embeds.safetensors", "<cat-toy>", vectors)
    theirs = StableDiffusionPipeline.from_pretrained(tiny["model"], safety_checker=None)
    theirs.load_textual_inversion(str(path))
    ours = minidiff.load(tiny["model"])
    assert ours.load_embedding(path) == ["<cat-toy>", "<cat-toy>_1"][:n]
    prompt = "a photo of a <cat-toy> on a table"
    converted = theirs.maybe_convert_prompt(prompt, theirs.tokenizer)   # "<cat-toy> <cat-toy>_1" for 2 vectors
    ids_theirs = theirs.tokenizer(converted, padding="max_length", max_length=77, return_tensors="pt").input_ids
    ids_ours = ours.tokenizer([ours.tokenizer.expand_multi_vector(prompt)])
    assert torch.equal(ids_ours, ids_theirs)
    with torch.no_grad():
        want = theirs.text_encoder(ids_theirs)[0]
        got = ours.text_encoder(ids_ours)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # the word is new to the vocabulary: loading it twice is refused, as diffusers does
    with pytest.raises(ValueError, match="already in the tokenizer.s vocabulary"):
        ours.load_embedding(path)
