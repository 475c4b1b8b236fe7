"""Chapter 8.1 — CLIP's tokenizer: a prompt becomes 77 integers.

CLIP (Radford et al., 2021) reads text as byte-level BPE tokens (Sennrich et al., 2016; GPT-2's byte alphabet):

  1. normalize   NFC, every run of whitespace -> one space, strip, lower-case
                 ("A  Pokémon\\tcellphone" -> "a pokémon cellphone")
  2. pre-split   CLIP's regex cuts the text into words: contractions ('s 't 're 've 'm 'll 'd), runs of letters,
                 single digits, runs of other symbols; whitespace is dropped
  3. bytes       each word's UTF-8 bytes are written with GPT-2's 256 printable stand-ins ("é" -> "Ã©")
                 and the word's last symbol gets the end-of-word mark "</w>"
  4. BPE         the 48,894 merges are applied in rank order: the adjacent pair of lowest rank is fused, again and
                 again, until no ranked pair is left; each remaining symbol is a vocabulary entry (49,408 in all)
  5. frame       <|startoftext|> (49406) + tokens + <|endoftext|> (49407), cut to 77 keeping the end token,
                 then padded to 77 with <|endoftext|> — the fixed-length context that SD's U-Net attends to.

Steps 1–4 are the `tokenizers` library's BPE model with the pipeline that transformers-5's `CLIPTokenizer` builds
from a vocab.json + merges.txt pair (its `tokenization_clip.py`; we add a Strip, which changes no id); step 5 is
written out here. The original
OpenAI tokenizer also ran ftfy.fix_text and html.unescape first; transformers does not (and neither do we), so
mojibake or HTML entities in a prompt are tokenized as written. (One more difference from the Python original:
`tokenizers` lower-cases letter by letter, so a word-final "Σ" becomes "σ", not str.lower()'s "ς".)

    tok = CLIPTokenizer()                       # minidiff's weights/clip-tokenizer
    tok(["a toucan", "A Pokémon cellphone"])    # LongTensor [2, 77]
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"  # also the padding and the unknown token
MAX_LENGTH = 77              # CLIP's context length: 75 text tokens between the two frame tokens
FILES = ("vocab.json", "merges.txt")

# CLIP's pre-tokenizer (clip/simple_tokenizer.py): the two special strings, English contractions, a run of letters,
# ONE digit (so "2022" is four tokens), or a run of anything that is neither space, letter nor digit.
PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""

_REPO = Path(__file__).resolve().parent.parent
# where CLIPTokenizer() looks: the copy shipped in the repo, then the project's shared folder beside the checkout
DEFAULT_DIRS = (_REPO / "weights" / "clip-tokenizer", _REPO.parent / "shared" / "clip-tokenizer")


class CLIPTokenizer:
    """CLIP's BPE tokenizer. `tok(texts)` -> LongTensor [B, 77] of ids, ready for the text transformer.

    path: a folder holding vocab.json + merges.txt (SD's `tokenizer/` folder has them); None = minidiff's own copy.
    """

    def __init__(self, path: str | Path | None = None, model_max_length: int = MAX_LENGTH):
        if path is None:
            path = _find_default_dir()
        self.path = Path(path)
        self.model_max_length = model_max_length
        vocab, merges = _read_vocab(self.path)
        # steps 3-4: BPE over byte symbols; a word's last symbol carries "</w>", so "a" alone ("a</w>", id 320)
        # and "a" starting a longer word ("a", id 64) are different tokens
        tk = Tokenizer(BPE(vocab, merges, unk_token=EOS_TOKEN, continuing_subword_prefix="",
                           end_of_word_suffix="</w>", fuse_unk=False, dropout=None))
        # step 1 (whitespace_clean(text).lower() in OpenAI's code; Strip never changes the ids, as step 2 drops spaces)
        tk.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                              normalizers.Strip(), normalizers.Lowercase()])
        # step 2, then the byte stand-ins of step 3. ByteLevel re-splits each piece with GPT-2's regex as transformers
        # does (use_regex=True); that never cuts one of CLIP's pieces except the literal specials, handled below.
        tk.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(PATTERN), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ])
        tk.decoder = decoders.ByteLevel()
        # the special tokens are matched in the raw text before any of the above: "<|endoftext|>" typed into a
        # prompt becomes id 49407 (as in transformers; "<|ENDOFTEXT|>" does not, it is lower-cased and spelled out)
        tk.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in (BOS_TOKEN, EOS_TOKEN)])
        self.bos_id, self.eos_id = tk.token_to_id(BOS_TOKEN), tk.token_to_id(EOS_TOKEN)
        if self.bos_id is None or self.eos_id is None:
            raise ValueError(f"{self.path / 'vocab.json'} lacks {BOS_TOKEN} or {EOS_TOKEN}")
        self.pad_id = self.eos_id
        # step 5's frame (transformers uses the same "Roberta" processor: <bos> text <eos>)
        tk.post_processor = processors.RobertaProcessing((EOS_TOKEN, self.eos_id), (BOS_TOKEN, self.bos_id),
                                                         trim_offsets=False, add_prefix_space=False)
        self._tk = tk
        self.multi_vector: dict[str, str] = {}   # a multi-vector embedding's word -> "<w> <w>_1 ..." (add_tokens)

    @classmethod
    def from_dir(cls, path: str | Path, **kwargs) -> "CLIPTokenizer":
        """Load from a folder with vocab.json + merges.txt, or with a transformers tokenizer.json."""
        return cls(path, **kwargs)

    @property
    def vocab_size(self) -> int:
        return self._tk.get_vocab_size(with_added_tokens=True)

    def add_tokens(self, tokens) -> list[int]:
        """Add new words to the vocabulary (textual inversion's placeholders) -> their ids (vocab_size, ...).
        A new word is matched in the raw prompt as a whole, before lower-casing and BPE. ValueError if one is
        already a word of the vocabulary."""
        tokens = [tokens] if isinstance(tokens, str) else list(tokens)
        for t in tokens:
            if not t or self._tk.token_to_id(t) is not None or self._tk.token_to_id(t + "</w>") is not None:
                raise ValueError(f"{t!r} is already in the vocabulary (or empty); a new token must be a new string")
        self._tk.add_tokens([AddedToken(t, normalized=False, special=False, single_word=False) for t in tokens])
        return [self._tk.token_to_id(t) for t in tokens]

    def _expand(self, text: str) -> str:
        for word, expansion in self.multi_vector.items():
            text = text.replace(word, expansion) if word in text and expansion not in text else text
        return text

    def encode(self, text: str) -> list[int]:
        """One prompt -> [bos, tokens..., eos], neither truncated nor padded."""
        return self._tk.encode(self._expand(text) if self.multi_vector else text).ids

    def __call__(self, texts: str | list[str], max_length: int | None = None) -> torch.Tensor:
        """Prompt(s) -> LongTensor [B, max_length] (a single str gives B = 1).

        Longer prompts are cut to max_length keeping <|endoftext|> last (what the model pools); shorter ones are
        padded with <|endoftext|> — SD v1 attends to all 77 positions, the padding included.
        """
        max_length = max_length or self.model_max_length
        if max_length < 2:
            raise ValueError(f"max_length must leave room for the start and end tokens, got {max_length}")
        if isinstance(texts, str):
            texts = [texts]
        if self.multi_vector:
            texts = [self._expand(t) for t in texts]
        rows = []
        for ids in (e.ids for e in self._tk.encode_batch(list(texts))):
            if len(ids) > max_length:
                ids = ids[:max_length - 1] + [self.eos_id]
            rows.append(ids + [self.pad_id] * (max_length - len(ids)))
        return torch.tensor(rows, dtype=torch.long).reshape(len(rows), max_length)  # [B, max_length]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        """Ids -> text. "</w>" marks become spaces, so words come back separated ("a pokémon cellphone !")."""
        if isinstance(ids, torch.Tensor):
            ids = ids.reshape(-1).tolist()
        text = self._tk.decode(list(ids), skip_special_tokens=skip_special_tokens)
        return text.replace("</w>", " ").strip()

    def convert_ids_to_tokens(self, ids) -> list[str]:
        """Ids -> vocabulary strings, in the byte alphabet ("pokÃ©mon</w>")."""
        if isinstance(ids, torch.Tensor):
            ids = ids.reshape(-1).tolist()
        return [self._tk.id_to_token(i) for i in ids]

    def save(self, path: str | Path) -> None:
        """Write vocab.json + merges.txt, plus tokenizer_config.json / special_tokens_map.json in the layout of SD's
        `tokenizer/` folder, so transformers' `CLIPTokenizer.from_pretrained(path)` loads it too."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self._tk.model.save(str(path))  # vocab.json (by id) + merges.txt ("#version: 0.2", then one merge a line)
        specials = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "unk_token": EOS_TOKEN, "pad_token": EOS_TOKEN}
        config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": self.model_max_length,
                  "do_lower_case": True, "errors": "replace", "add_prefix_space": False, **specials}
        for name, obj in (("tokenizer_config.json", config), ("special_tokens_map.json", specials)):
            (path / name).write_text(json.dumps(obj, indent=2) + "\n")
        notice = self.path / "NOTICE"  # the vocabulary's MIT licence travels with it
        if notice.is_file() and notice.resolve() != (path / "NOTICE").resolve():
            shutil.copyfile(notice, path / "NOTICE")

    def __repr__(self):
        return f"CLIPTokenizer({str(self.path)!r}, vocab_size={self.vocab_size}, model_max_length={self.model_max_length})"


def _read_vocab(path: Path):
    """vocab {token: id} and merges [(a, b)] from vocab.json + merges.txt (SD v1.4's release), or from the single
    tokenizer.json that transformers 5 writes when it saves a tokenizer."""
    if all((path / f).is_file() for f in FILES):
        return BPE.read_file(str(path / "vocab.json"), str(path / "merges.txt"))
    if (path / "tokenizer.json").is_file():
        model = json.loads((path / "tokenizer.json").read_text(encoding="utf-8"))["model"]
        merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
        return model["vocab"], merges
    missing = [str(path / f) for f in FILES if not (path / f).is_file()]
    raise FileNotFoundError(f"CLIP tokenizer files not found: {', '.join(missing)} (nor {path / 'tokenizer.json'})")


def _find_default_dir() -> Path:
    for d in DEFAULT_DIRS:
        if all((d / f).is_file() for f in FILES):
            return d
    tried = ", ".join(str(d) for d in DEFAULT_DIRS)
    raise FileNotFoundError(f"no CLIP tokenizer found (vocab.json + merges.txt) in: {tried}; "
                            "pass a folder, e.g. an SD checkpoint's tokenizer/")
