"""Long prompts and (word:1.3) weighting -> text embeddings, built the way AUTOMATIC1111's webui builds them.

CLIP's text encoder has 77 positions: <start>, 75 tokens, <end>. A longer prompt is cut into chunks of 75 tokens;
each chunk is framed and padded to 77 on its own and encoded on its own, and the chunks' contexts are concatenated
along the sequence axis:

    "a castle on a hill, ... (120 tokens)"  ->  [<s> t1 .. t75 </s>] [<s> t76 .. t120 </s> </s> ...]
                                            ->  text encoder, each [77, d]  ->  context [2·77, d]

The U-Net's cross-attention takes a context of any length, so nothing else changes. All prompts in one batch, and
the negative prompts that guidance pairs with them, are padded to the same number of chunks with the encoding of
the empty prompt "" (A1111's rule for cond/uncond of different lengths). A prompt of up to 75 tokens gives exactly
the 77-token context of diffusers' pipeline. (A1111 also moves the words after a comma near a chunk's end into
the next chunk, and knows a BREAK keyword; minidiff cuts at exactly 75 tokens and has no BREAK.)

Weighting, with A1111's syntax (its prompt_parser.parse_prompt_attention):
    (word)        weight × 1.1          ((word)) × 1.21, and so on
    [word]        weight ÷ 1.1
    (word:1.3)    weight × 1.3          (several words:0.8) works too
    \\( \\) \\[ \\]   literal brackets       unbalanced brackets close at the end of the prompt
and A1111's "Original" emphasis: the weight scales the text encoder's OUTPUT vector of each of the word's tokens,
then the chunk is rescaled so its mean is what it was:
    z' = w ⊙ z    (w: one weight per position; 1 for <start>, <end> and padding)
    z'' = z' · mean(z) / mean(z')                       (means over the whole [77, d] chunk)
"""
from __future__ import annotations

import math
import re

import torch
from einops import rearrange

ROUND, SQUARE = 1.1, 1 / 1.1   # (word) and [word]

# One token of the weighting syntax per match: an escaped character, an opening bracket, ":1.3)" (a closing
# round bracket with its weight), a closing bracket, a run of plain text, or a lone ":".
_ATTENTION = re.compile(r"""
\\\(|\\\)|\\\[|\\]|\\\\|\\|
\(|\[|
:\s*([+-]?[.\d]+)\s*\)|
\)|]|
[^\\()\[\]:]+|
:
""", re.X)


def parse_prompt_attention(text: str) -> list[tuple[str, float]]:
    """A prompt -> [(text, weight), ...], runs of equal weight merged.

    >>> parse_prompt_attention("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).")
    [('a ', 1.0), ('house', 1.573), (' ', 1.1), ('on', 1.0), (' a ', 1.1), ('hill', 0.55), (', sun, ', 1.1),
     ('sky', 1.4641), ('.', 1.1)]                                                          (weights rounded here)
    """
    res: list[list] = []                 # [text, weight] pieces so far
    round_open, square_open = [], []     # where each still-open bracket started (an index into res)

    def multiply_range(start: int, factor: float):
        for piece in res[start:]:
            piece[1] *= factor

    for m in _ATTENTION.finditer(text):
        token, weight = m.group(0), m.group(1)
        if token.startswith("\\"):
            res.append([token[1:], 1.0])
        elif token == "(":
            round_open.append(len(res))
        elif token == "[":
            square_open.append(len(res))
        elif weight is not None and round_open:
            try:
                factor = float(weight)
            except ValueError:
                raise ValueError(f"prompt weight {weight!r} is not a number in {text!r}") from None
            multiply_range(round_open.pop(), factor)
        elif token == ")" and round_open:
            multiply_range(round_open.pop(), ROUND)
        elif token == "]" and square_open:
            multiply_range(square_open.pop(), SQUARE)
        else:  # plain text (or a bracket that closes nothing: kept as text)
            res.append([token, 1.0])
    for start in round_open:             # unbalanced: closed at the end
        multiply_range(start, ROUND)
    for start in square_open:
        multiply_range(start, SQUARE)

    merged: list[list] = []
    for piece in res or [["", 1.0]]:
        if merged and merged[-1][1] == piece[1]:
            merged[-1][0] += piece[0]
        else:
            merged.append(list(piece))
    return [(t, w) for t, w in merged]


def tokenize_weighted(tokenizer, text: str, weighting: bool = True) -> tuple[list[int], list[float]]:
    """A prompt -> its token ids (no <start>/<end>) and one weight per token. Each weighted piece is tokenized on
    its own, as A1111 does ("a (red) car" is "a ", "red", " car")."""
    pieces = parse_prompt_attention(text) if weighting else [(text, 1.0)]
    ids, weights = [], []
    for piece, w in pieces:
        tokens = tokenizer.encode(piece)[1:-1]  # drop the frame <start> ... <end>
        ids += tokens
        weights += [w] * len(tokens)
    return ids, weights


def chunk(ids: list[int], weights: list[float], bos: int, eos: int, length: int = 75):
    """Token ids and weights -> k = max(1, ⌈n/75⌉) framed chunks: ids LongTensor [k, 77], weights [k, 77]."""
    k = max(1, math.ceil(len(ids) / length))
    rows, wrows = [], []
    for c in range(k):
        part, w = ids[c * length:(c + 1) * length], weights[c * length:(c + 1) * length]
        pad = length - len(part)
        rows.append([bos] + part + [eos] * pad + [eos])        # <start> tokens <end>, padded with <end>
        wrows.append([1.0] + w + [1.0] * (pad + 1))
    return torch.tensor(rows, dtype=torch.long), torch.tensor(wrows, dtype=torch.float32)


def chunk_count(tokenizer, text: str, weighting: bool = True) -> int:
    """How many 77-position chunks `text` is encoded in: max(1, ⌈tokens/75⌉) (the context has 77 times as many
    positions). Tokenizes only: validation asks it before any encoding."""
    ids, _ = tokenize_weighted(tokenizer, tokenizer.expand_multi_vector(text), weighting)
    return max(1, math.ceil(len(ids) / (tokenizer.model_max_length - 2)))


def apply_weights(z: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """A1111's emphasis on one chunk: z [77, d], weights [77] -> w ⊙ z, rescaled to the mean of z."""
    if bool((weights == 1).all()):
        return z
    weighted = z * weights.to(z)[:, None]                        # [77, d] · [77, 1]
    return weighted * (z.mean() / weighted.mean())


@torch.no_grad()
def encode(tokenizer, text_encoder, prompts: list[str], device=None, weighting: bool = True) -> list[torch.Tensor]:
    """Prompts -> one context per prompt, [k_i·77, d] (k_i chunks; not yet padded to a common length).
    All chunks of all prompts go through the text encoder as one batch."""
    bos, eos = tokenizer.bos_id, tokenizer.eos_id
    length = tokenizer.model_max_length - 2   # 75 tokens between <start> and <end>
    ids, weights, counts = [], [], []
    for text in prompts:
        text = tokenizer.expand_multi_vector(text)   # a multi-vector embedding's word -> tok tok_1 ... (diffusers' rule)
        i, w = chunk(*tokenize_weighted(tokenizer, text, weighting), bos, eos, length)
        ids.append(i)
        weights.append(w)
        counts.append(len(i))
    z = text_encoder(torch.cat(ids).to(device))                   # [Σk, 77, d]
    w = torch.cat(weights)                                         # [Σk, 77]
    z = torch.stack([apply_weights(zc, wc) for zc, wc in zip(z, w)])
    return [rearrange(part, "k n d -> (k n) d") for part in z.split(counts)]


def pad_to_same_length(contexts: list[torch.Tensor], empty: torch.Tensor, length: int | None = None) -> torch.Tensor:
    """Contexts [k_i·77, d] -> one tensor [B, L, d], L = `length` or the longest: the shorter ones get the empty
    prompt's context `empty` [77, d] appended until they are L long (A1111's padding of cond/uncond)."""
    n = empty.shape[0]
    length = length or max(c.shape[0] for c in contexts)
    out = []
    for c in contexts:
        missing = length - c.shape[0]
        if missing < 0 or missing % n:
            raise ValueError(f"a prompt's context has {c.shape[0]} positions, which cannot be padded with "
                             f"{n}-position chunks to the {length} positions of the batch")
        out.append(torch.cat([c, empty.to(c).repeat(missing // n, 1)]))
    return torch.stack(out)


@torch.no_grad()
def encode_batch(tokenizer, text_encoder, prompts: list[str], device=None, weighting: bool = True,
                 length: int | None = None) -> torch.Tensor:
    """Prompts -> contexts [B, L, d], padded with the empty prompt's context to the longest (or to `length`)."""
    contexts = encode(tokenizer, text_encoder, prompts, device, weighting)
    length = length or max(c.shape[0] for c in contexts)
    if all(c.shape[0] == length for c in contexts):
        return torch.stack(contexts)
    empty, = encode(tokenizer, text_encoder, [""], device, weighting)
    return pad_to_same_length(contexts, empty, length)
