"""minidiff.tokenizer.CLIPTokenizer against transformers' CLIPTokenizer and a pure-Python BPE reference."""
import json
import unicodedata

import pytest
import torch

from minidiff import tokenizer as tokmod
from minidiff.tokenizer import CLIPTokenizer

MONOGRAPH = ["A toucan", "A Pokémon cellphone", "A eletric type fridge", "A mix of Pikachu and Rayquaza"]
CORPUS = MONOGRAPH + [
    "a photo of an astronaut riding a horse on mars",
    # accents, precomposed and decomposed (NFC makes "e" + U+0301 the same token as "é")
    "Crème brûlée à la française, naïve café", "Ångström façade – señor Müller", "Poke\u0301mon",
    # emoji (skin tone modifier, zero-width-joiner family), CJK, other scripts
    "🤗 a cat 🐱 with 👍🏽 and a family 👨‍👩‍👧", "日本語のテキスト", "东京塔 at night", "한국어 문장",
    "Привет мир", "مرحبا بالعالم", "नमस्ते दुनिया",
    # whitespace: leading/trailing, tabs, newlines, CRLF, no-break space, only whitespace
    "  leading and trailing  ", "tabs\tand\nnewlines\r\nmixed \u00a0 nbsp", "\n\n\t  ", " ",
    # punctuation, numbers (one digit a token), apostrophes (ASCII and curly), upper case
    "Hello, world!!! (really?) -- yes... [ok] {x} <tag> @user #hashtag $100 50% a&b a+b=c",
    "...", "!!!???", "1024x1024, 3.14159, 2022, 1st 2nd 3rd",
    "don't can't it's we're I've I'm you'll he'd", "rock 'n' roll", "’curly’ quotes don’t", "O'Neil's ''s",
    "A PHOTO OF A CAT", "McDonald's iPhone", "a", "",
    # longer than 77 tokens: truncated keeping <|endoftext|> last
    " ".join(["a very long prompt"] * 40), "1234567890" * 10,
    "masterpiece, best quality, ultra-detailed, 8k, " * 12,
]
# Checked against transformers only, as the old Python tokenizer differs on them: the literal special strings are
# picked out of the raw text by transformers-5 (and us), while the old one lower-cased "<|ENDOFTEXT|>" first and then
# mapped it to 49407 too; and Python's str.lower() writes a word-final capital sigma as "ς", `tokenizers` as "σ".
TRANSFORMERS_ONLY = ["hello <|endoftext|> world", "a<|startoftext|>b", "<|ENDOFTEXT|>x", "ΟΔΟΣ ΣΟΦΙΑΣ"]


@pytest.fixture(scope="module")
def tok():
    return CLIPTokenizer()


@pytest.fixture(scope="module")
def hf_classes():
    transformers = pytest.importorskip("transformers")
    classes = [transformers.CLIPTokenizer]
    fast = getattr(transformers, "CLIPTokenizerFast", None)  # in transformers 5 an alias of CLIPTokenizer
    if fast is not None and fast is not transformers.CLIPTokenizer:
        classes.append(fast)
    return classes


def _hf(cls, path):
    try:
        return cls.from_pretrained(str(path), local_files_only=True)
    except OSError as e:  # pragma: no cover - only when the class cannot be built offline
        pytest.skip(f"{cls.__name__} does not load offline: {e}")


def test_ids_equal_transformers(tok, hf_classes):
    for cls in hf_classes:
        hf = _hf(cls, tok.path)
        for texts in (CORPUS, TRANSFORMERS_ONLY):
            ref = hf(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
            ours = tok(texts)
            assert ours.dtype == torch.long and ours.shape == (len(texts), 77)
            for text, a, b in zip(texts, ours, ref):
                assert a.tolist() == b.tolist(), (cls.__name__, text)
            for text in texts:  # unpadded, untruncated
                assert tok.encode(text) == hf(text).input_ids, text
        # decoding follows transformers' (ByteLevel bytes -> text, "</w>" -> " ", strip)
        for text in CORPUS[:12]:
            ids = tok(text)[0]
            assert tok.decode(ids) == hf.decode(ids.tolist(), skip_special_tokens=True)
            assert tok.decode(ids, skip_special_tokens=False) == hf.decode(ids.tolist())


def test_framing_padding_truncation(tok):
    ids = tok("A toucan")
    assert ids.shape == (1, 77)
    row = ids[0].tolist()
    assert row[0] == tok.bos_id == 49406 and tok.eos_id == tok.pad_id == 49407
    n = len(tok.encode("A toucan"))
    assert row[:n] == tok.encode("A toucan") and row[n:] == [tok.pad_id] * (77 - n)
    assert tok("")[0, :2].tolist() == [49406, 49407]
    with pytest.warns(UserWarning, match="has 160 tokens but only 75 fit: the last 85 tokens were dropped"):
        long = tok(" ".join(["a very long prompt"] * 40))[0].tolist()
    assert long[0] == 49406 and long[-1] == 49407 and long[1:76] == tok.encode(" ".join(["a very long prompt"] * 40))[1:76]
    assert tok("a toucan", max_length=10).shape == (1, 10)
    assert tok.vocab_size == 49408 and tok.model_max_length == 77
    assert tok.decode(tok("  A   Pokémon\tCellphone ")[0]) == "a pokémon cellphone"
    # normalization: NFD input gives the NFC ids; case and spacing do not matter
    assert tok.encode("Poke\u0301mon") == tok.encode("Pokémon") == tok.encode("  POKÉMON ")


# --- an independent reference: the byte-level BPE written out in Python, as OpenAI's simple_tokenizer.py and
# transformers-4's slow CLIPTokenizer did it (with unicodedata NFC in place of ftfy.fix_text, which is not installed)

def _bytes_to_unicode():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


class _SlowCLIPTokenizer:
    def __init__(self, folder):
        import regex
        self.encoder = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
        lines = (folder / "merges.txt").read_text(encoding="utf-8").strip().split("\n")[1:]
        self.ranks = {tuple(m.split()): i for i, m in enumerate(lines)}
        self.byte_encoder = _bytes_to_unicode()
        self.pat = regex.compile(tokmod.PATTERN, regex.IGNORECASE)
        self.ws = regex.compile(r"\s+")

    def bpe(self, token):
        word = tuple(token[:-1]) + (token[-1] + "</w>",)
        while len(word) > 1:
            pairs = {(a, b) for a, b in zip(word, word[1:])}
            first, second = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
            if (first, second) not in self.ranks:
                break
            new, i = [], 0
            while i < len(word):  # fuse every non-overlapping occurrence, left to right
                if i < len(word) - 1 and word[i] == first and word[i + 1] == second:
                    new.append(first + second)
                    i += 2
                else:
                    new.append(word[i])
                    i += 1
            word = tuple(new)
        return word

    def encode(self, text):
        text = self.ws.sub(" ", unicodedata.normalize("NFC", text)).strip().lower()
        ids = [self.encoder["<|startoftext|>"]]
        for piece in self.pat.findall(text):
            piece = "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))
            ids += [self.encoder[t] for t in self.bpe(piece)]
        return ids + [self.encoder["<|endoftext|>"]]


def test_ids_equal_python_reference(tok):
    pytest.importorskip("regex")
    slow = _SlowCLIPTokenizer(tok.path)
    for text in CORPUS:
        assert tok.encode(text) == slow.encode(text), text


def test_save_round_trip(tok, tmp_path, hf_classes):
    tok.save(tmp_path / "tok")
    for f in ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json", "NOTICE"):
        assert (tmp_path / "tok" / f).is_file(), f
    assert (tmp_path / "tok" / "merges.txt").read_bytes() == (tok.path / "merges.txt").read_bytes()
    again = CLIPTokenizer.from_dir(tmp_path / "tok")
    assert torch.equal(again(CORPUS), tok(CORPUS))
    hf = _hf(hf_classes[0], tmp_path / "tok")  # the transformers/diffusers layout: loads with max length 77
    assert hf.model_max_length == 77
    ref = hf(CORPUS, padding="max_length", truncation=True, return_tensors="pt").input_ids
    assert torch.equal(ref, tok(CORPUS))


def test_missing_files(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="vocab.json"):
        CLIPTokenizer.from_dir(tmp_path)
    (tmp_path / "vocab.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="merges.txt"):
        CLIPTokenizer.from_dir(tmp_path)
    nowhere = (tmp_path / "a", tmp_path / "b")
    monkeypatch.setattr(tokmod, "DEFAULT_DIRS", nowhere)
    with pytest.raises(FileNotFoundError) as e:
        CLIPTokenizer()
    assert str(nowhere[0]) in str(e.value) and str(nowhere[1]) in str(e.value)
