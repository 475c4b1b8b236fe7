"""Chapter 8 — CLIP: the text transformer SD listens to, a small image tower, and the contrastive loss that joins them.

CLIP (Radford et al., 2021, "Learning Transferable Visual Models From Natural Language Supervision") trains a text
encoder and an image encoder side by side so that a caption and its picture land on the same direction of a shared
embedding space:

    prompt -> CLIPTokenizer -> ids [B, 77] -> CLIPTextTransformer -> [B, 77, d]   <- SD's U-Net cross-attends to this
                                                   \\-> the vector at <|endoftext|> -> text_projection  -> t  [B, e]
    image  -> CLIPImageEncoder (a ViT) -> the vector at [CLS]  -> visual_projection -> v  [B, e]

    logits[i, j] = exp(τ) · cos(t_i, v_j),   loss = symmetric cross-entropy with the true pairs on the diagonal (§2.3)

Stable Diffusion v1 keeps only the text half of OpenAI's ViT-L/14 CLIP, frozen: 12 layers, width 768, 12 heads, and it
uses the whole last hidden state [B, 77, 768] (after the final layer norm), not the pooled vector.

The text transformer is GPT-2 shaped (§2.4): token + learned position embeddings, pre-norm layers of causal
self-attention (a token sees only the tokens before it) and a quick-GELU MLP, a final layer norm. Parameter names are
transformers-5 CLIPTextModel's state_dict keys, so its weights load with load_state_dict(strict=True); the image tower
likewise mirrors CLIPVisionModel, and CLIPModel mirrors transformers' CLIPModel.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from . import kernels
from .formats import configs
from .nn import attention
from .nn.layers import Conv2d, LayerNorm, Linear


def quick_gelu(x):
    """x·σ(1.702x): the sigmoid approximation of GELU (Hendrycks & Gimpel, 2016, §2) that OpenAI's CLIP trained with."""
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": F.gelu}  # gelu (exact, erf): OpenCLIP's towers, e.g. SD 2's


# --- configs ----------------------------------------------------------------------------------------------------

class _Config:
    """What the two towers' configs share: the check that the activation is one this CLIP builds, and the
    transformers config.json translation, which is minidiff/formats/configs.py."""
    _tower = ""  # "text" | "image": which tower's transformers config this is (formats.configs.CLIP_TOWERS)

    def __post_init__(self):
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"unsupported hidden_act {self.hidden_act!r}; minidiff's CLIP has {sorted(ACTIVATIONS)}")

    @classmethod
    def from_transformers(cls, d: dict):
        """A transformers config.json dict of this tower, or of a whole CLIPModel (its part is taken) -> this
        config; keys that are not fields are ignored. (formats.configs.clip_from_transformers)"""
        return configs.clip_from_transformers(cls, d, cls._tower)

    def to_transformers(self) -> dict:
        """The config.json dict transformers' CLIPTextConfig / CLIPVisionConfig reads.
        (formats.configs.clip_to_transformers)"""
        return configs.clip_to_transformers(self, self._tower)


@dataclass
class CLIPTextConfig(_Config):
    """The text transformer's shape. The defaults are SD v1's text encoder (OpenAI CLIP ViT-L/14's text half)."""
    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"
    projection_dim: int = 768  # read by a CLIPModel's text_projection in transformers; unused by the text tower itself
    pad_token_id: int = 1
    bos_token_id: int = 49406
    eos_token_id: int = 49407  # SD v1.4's config.json says 2 (a pre-2023 value): see CLIPTextTransformer.eos_positions
    _tower = "text"


@dataclass
class CLIPImageConfig(_Config):
    """A small ViT (Dosovitskiy et al., 2021) for toy images: (image_size / patch_size)² patches + one [CLS] token."""
    image_size: int = 32
    patch_size: int = 8
    num_channels: int = 3
    hidden_size: int = 64
    intermediate_size: int = 256
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"
    _tower = "image"


# --- the transformer layer both towers share --------------------------------------------------------------------

class CLIPAttention(nn.Module):
    """Multi-head self-attention with biased q/k/v/out projections. x [B, L, dim] -> [B, L, dim]."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"hidden_size {dim} is not divisible by num_attention_heads {heads}")
        self.heads = heads
        self.q_proj = Linear(dim, dim)
        self.k_proj = Linear(dim, dim)
        self.v_proj = Linear(dim, dim)
        self.out_proj = Linear(dim, dim)

    def forward(self, x, mask=None, causal: bool = False, residual=None):
        h = self.heads
        if kernels.can_stack(self.q_proj, self.k_proj, self.v_proj):   # one matmul against [W_q; W_k; W_v]
            qkv = kernels.linear(x, *kernels.stacked(self.q_proj, self.k_proj, self.v_proj))    # [B, L, 3D]
            q, k, v = rearrange(qkv, "b l (three h d) -> three b h l d", three=3, h=h).unbind(0)
        else:
            q, k, v = (rearrange(proj(x), "b l (h d) -> b h l d", h=h)                         # [B, h, L, D/h]
                       for proj in (self.q_proj, self.k_proj, self.v_proj))
        out = attention(q, k, v, mask=mask, causal=causal)       # softmax(QKᵀ/√(D/h)) V: [B, h, L, D/h]
        out = rearrange(out, "b h l d -> b l (h d)")             # heads side by side again: [B, L, D]
        return self.out_proj(out) if residual is None else self.out_proj(out, add=residual)


class CLIPMLP(nn.Module):
    """dim -> intermediate -> dim with quick-GELU in between. [B, L, dim] -> [B, L, dim]."""

    def __init__(self, dim: int, inner: int, act: str):
        super().__init__()
        self.act = ACTIVATIONS[act]
        self.fc1 = Linear(dim, inner)
        self.fc2 = Linear(inner, dim)

    def forward(self, x, residual=None):
        h = self.act(self.fc1(x))                                 # [B, L, inner]
        return self.fc2(h) if residual is None else self.fc2(h, add=residual)


class CLIPEncoderLayer(nn.Module):
    """Pre-norm transformer layer (GPT-2 style): x = x + Attn(LN(x)); x = x + MLP(LN(x)). [B, L, d] -> [B, L, d]."""

    def __init__(self, cfg):
        super().__init__()
        d = cfg.hidden_size
        self.self_attn = CLIPAttention(d, cfg.num_attention_heads)
        self.layer_norm1 = LayerNorm(d, eps=cfg.layer_norm_eps)
        self.mlp = CLIPMLP(d, cfg.intermediate_size, cfg.hidden_act)
        self.layer_norm2 = LayerNorm(d, eps=cfg.layer_norm_eps)

    def forward(self, x, mask=None, causal: bool = False):
        x = self.self_attn(self.layer_norm1(x), mask=mask, causal=causal, residual=x)   # x + Attn(LN(x))
        return self.mlp(self.layer_norm2(x), residual=x)                               # x + MLP(LN(x))


class CLIPEncoder(nn.Module):
    """A stack of num_hidden_layers CLIPEncoderLayers ("encoder.layers.N" in the checkpoints)."""

    def __init__(self, cfg):
        super().__init__()
        self.layers = nn.ModuleList([CLIPEncoderLayer(cfg) for _ in range(cfg.num_hidden_layers)])

    def forward(self, x, mask=None, causal: bool = False):
        for layer in self.layers:
            x = layer(x, mask=mask, causal=causal)
        return x


# --- the text tower ---------------------------------------------------------------------------------------------

class CLIPTextEmbeddings(nn.Module):
    """ids [B, L] -> token embedding + learned position embedding [B, L, d]."""

    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embedding = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)

    def forward(self, ids):
        L = ids.shape[-1]
        if L > self.position_embedding.num_embeddings:
            raise ValueError(f"sequence of {L} tokens is longer than the {self.position_embedding.num_embeddings} "
                             "learned positions (tokenize with max_length)")
        pos = torch.arange(L, device=ids.device)
        return self.token_embedding(ids) + self.position_embedding(pos)  # [B, L, d] + [L, d]


class CLIPTextTransformer(nn.Module):
    """CLIP's text encoder = transformers' CLIPTextModel (same state_dict keys). ids [B, L] -> [B, L, d]."""

    def __init__(self, config: CLIPTextConfig | None = None):
        super().__init__()
        self.config = config = config or CLIPTextConfig()
        self.embeddings = CLIPTextEmbeddings(config)
        self.encoder = CLIPEncoder(config)
        self.final_layer_norm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        _init_weights(self, config)

    def forward(self, ids, attention_mask=None):
        """ids [B, L] -> last_hidden_state [B, L, d], after the final layer norm (what SD's U-Net attends to).

        Attention is causal: position i mixes positions 0..i only, so a token's vector never depends on the padding
        after it. attention_mask [B, L] (1 = token, 0 = padding) additionally hides padded keys; SD v1 passes none.
        """
        x = self.embeddings(ids)                                # [B, L, d]
        mask = None
        if attention_mask is not None:
            mask = attention_mask.bool()[:, None, None, :]      # [B, 1, 1, L]: which keys each query may see
        x = self.encoder(x, mask=mask, causal=True)             # [B, L, d]
        return self.final_layer_norm(x)

    @torch.no_grad()
    def add_token_embeddings(self, vectors: torch.Tensor) -> None:
        """Grow the token embedding by n rows holding `vectors` [n, d] (new tokens: textual inversion); the old rows
        stay bit-identical, the new ones get the ids vocab_size, ..., vocab_size + n - 1."""
        old = self.embeddings.token_embedding
        vectors = torch.as_tensor(vectors)
        if vectors.dim() == 1:
            vectors = vectors[None]                                     # [d] -> [1, d]
        if vectors.dim() != 2 or vectors.shape[1] != old.embedding_dim:
            raise ValueError(f"vectors must be [n, {old.embedding_dim}] (this text encoder's width), "
                             f"got {tuple(vectors.shape)}")
        w = old.weight
        new = nn.Embedding(w.shape[0] + vectors.shape[0], w.shape[1], device=w.device, dtype=w.dtype)
        new.weight.copy_(torch.cat([w, vectors.to(w.device, w.dtype)]))  # [V + n, d]
        new.weight.requires_grad_(w.requires_grad)
        self.embeddings.token_embedding = new
        self.config.vocab_size = new.num_embeddings

    def eos_positions(self, ids):
        """[B] index of the token that sums up each prompt: the first <|endoftext|> (transformers-5's rule).

        Configs written before transformers PR #24773 (SD v1.4's among them) say eos_token_id = 2; for those
        transformers keeps the old rule, the position of the largest id — also <|endoftext|> (49407), the first one.
        """
        if self.config.eos_token_id == 2:
            return ids.argmax(dim=-1)
        return (ids == self.config.eos_token_id).int().argmax(dim=-1)

    def pooled(self, ids, last_hidden_state=None, attention_mask=None):
        """ids [B, L] -> [B, d]: the final hidden state at <|endoftext|> (causal attention: it has read the prompt)."""
        h = self(ids, attention_mask) if last_hidden_state is None else last_hidden_state  # [B, L, d]
        return h[torch.arange(h.shape[0], device=h.device), self.eos_positions(ids)]


# --- the image tower --------------------------------------------------------------------------------------------

class CLIPImageEmbeddings(nn.Module):
    """images [B, C, H, W] -> [CLS] + one vector per P×P patch, plus learned positions: [B, 1 + (H/P)(W/P), d]."""

    def __init__(self, cfg: CLIPImageConfig):
        super().__init__()
        d, P = cfg.hidden_size, cfg.patch_size
        self.image_size = cfg.image_size
        self.class_embedding = nn.Parameter(torch.randn(d))
        # a P×P convolution with stride P = one linear map applied to every non-overlapping patch
        self.patch_embedding = Conv2d(cfg.num_channels, d, kernel_size=P, stride=P, bias=False)
        self.position_embedding = nn.Embedding((cfg.image_size // P) ** 2 + 1, d)

    def forward(self, images):
        B, _, H, W = images.shape
        if (H, W) != (self.image_size, self.image_size):
            raise ValueError(f"images are {H}×{W}, the encoder was built for {self.image_size}×{self.image_size}")
        x = self.patch_embedding(images.to(self.patch_embedding.weight.dtype))  # [B, d, H/P, W/P]
        x = x.flatten(2).transpose(1, 2)                                        # [B, N, d], patches in raster order
        cls = self.class_embedding.expand(B, 1, -1)                             # [B, 1, d]
        x = torch.cat([cls, x], dim=1)                                          # [B, 1 + N, d]
        return x + self.position_embedding.weight                               # + [1 + N, d]


class CLIPImageEncoder(nn.Module):
    """CLIP's ViT image tower = transformers' CLIPVisionModel (same state_dict keys). [B, C, H, W] -> [B, d].

    The same pre-norm layers as the text tower, without the causal mask (every patch sees every patch), plus a layer
    norm before them ("pre_layrnorm", sic, as in the checkpoints) and one on the [CLS] output.
    """

    def __init__(self, config: CLIPImageConfig | None = None):
        super().__init__()
        self.config = config = config or CLIPImageConfig()
        self.embeddings = CLIPImageEmbeddings(config)
        self.pre_layrnorm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.encoder = CLIPEncoder(config)
        self.post_layernorm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        _init_weights(self, config)

    def tokens(self, images):
        """[B, C, H, W] -> last hidden state [B, 1 + N, d] (before post_layernorm, as transformers reports it)."""
        return self.encoder(self.pre_layrnorm(self.embeddings(images)))

    def forward(self, images):
        """[B, C, H, W] -> [B, d]: the [CLS] token's final state, layer-normed."""
        return self.post_layernorm(self.tokens(images)[:, 0])


# --- the two towers together: CLIP ------------------------------------------------------------------------------

def clip_loss(logits_per_text):
    """Symmetric InfoNCE (CLIP §2.3 and its Figure 3 pseudocode). logits_per_text [N, N] -> scalar.

    Row i holds caption i's scores against the N images of the batch; the true image is image i, so each row is an
    N-way classification with label i (text -> image), and each column one more (image -> text):

        loss = ( CE(logits, arange(N)) + CE(logitsᵀ, arange(N)) ) / 2
    """
    labels = torch.arange(logits_per_text.shape[0], device=logits_per_text.device)
    return (F.cross_entropy(logits_per_text, labels) + F.cross_entropy(logits_per_text.t(), labels)) / 2


def multi_positive_infonce(logits_per_text, labels):
    """clip_loss when captions repeat in a batch. logits_per_text [B, B] (texts × images), labels [B] caption ids
    -> scalar.

    With few distinct captions (the shapes world has 15) a batch holds several copies of each, and clip_loss's one-hot
    targets (the diagonal) would push apart an image and an identical caption of another row. Instead every pair with
    the same caption is a positive and the target row is spread evenly over them:
        target[i, j] = [y_i = y_j] / Σ_k [y_i = y_k],   loss = ( CE(logits, target) + CE(logitsᵀ, target) ) / 2
    (the supervised-contrastive reading of Khosla et al. 2020). With all captions distinct this IS clip_loss."""
    same = (labels[:, None] == labels[None, :]).float()             # [B, B]
    target = same / same.sum(dim=1, keepdim=True)                   # each row sums to 1
    return (F.cross_entropy(logits_per_text, target) + F.cross_entropy(logits_per_text.t(), target)) / 2


class CLIPModel(nn.Module):
    """Text tower + image tower + linear projections into a shared e-dimensional space + a learned temperature.

    Parameter names are transformers' CLIPModel's: text_model.*, vision_model.*, text_projection, visual_projection,
    logit_scale. logit_scale = log(1/τ) starts at log(1/0.07) (§2.5); the paper clips exp(logit_scale) at 100 during
    training — do that in the training loop (`model.logit_scale.data.clamp_(max=math.log(100))`), as OpenAI did.
    """

    def __init__(self, text_config: CLIPTextConfig | None = None, image_config: CLIPImageConfig | None = None,
                 embed_dim: int = 512, logit_scale_init: float = math.log(1 / 0.07)):
        super().__init__()
        self.text_model = CLIPTextTransformer(text_config)
        self.vision_model = CLIPImageEncoder(image_config)
        dt, dv = self.text_model.config.hidden_size, self.vision_model.config.hidden_size
        self.text_projection = Linear(dt, embed_dim, bias=False)
        self.visual_projection = Linear(dv, embed_dim, bias=False)
        nn.init.normal_(self.text_projection.weight, std=dt ** -0.5)
        nn.init.normal_(self.visual_projection.weight, std=dv ** -0.5)
        self.logit_scale = nn.Parameter(torch.tensor(float(logit_scale_init)))

    def encode_text(self, ids, attention_mask=None):
        """ids [B, L] -> unit vectors [B, e]."""
        t = self.text_projection(self.text_model.pooled(ids, attention_mask=attention_mask))  # [B, e]
        return t / t.norm(dim=-1, keepdim=True)

    def encode_image(self, images):
        """images [B, C, H, W] -> unit vectors [B, e]."""
        v = self.visual_projection(self.vision_model(images))  # [B, e]
        return v / v.norm(dim=-1, keepdim=True)

    def logits(self, ids, images, attention_mask=None):
        """logits_per_text [B_text, B_image] = exp(logit_scale) · cosine similarities; transpose for per image."""
        return self.logit_scale.exp() * self.encode_text(ids, attention_mask) @ self.encode_image(images).t()

    def forward(self, ids, images, attention_mask=None):
        """A batch of N matching (caption, image) pairs -> the contrastive loss (a scalar)."""
        return clip_loss(self.logits(ids, images, attention_mask))


@torch.no_grad()
def zero_shot_classify(model: CLIPModel, tokenizer, images, class_prompts: list[str]):
    """CLIP as a classifier with no training on the classes (§3.1.2): one prompt per class ("a photo of a {c}"),
    each image goes to the prompt it is most similar to. images [B, C, H, W] -> probabilities [B, n_classes]."""
    ids = tokenizer(class_prompts, max_length=model.text_model.config.max_position_embeddings)  # [n_classes, L]
    ids = ids.to(model.logit_scale.device)
    logits_per_image = model.logit_scale.exp() * model.encode_image(images) @ model.encode_text(ids).t()  # [B, n]
    return logits_per_image.softmax(dim=-1)


# --- initialization (OpenAI's CLIP `initialize_parameters`) -----------------------------------------------------

def _init_weights(tower: nn.Module, cfg) -> None:
    """Random weights for training from scratch; loading a checkpoint overwrites them all.

    Embeddings N(0, 0.02²) (positions 0.01²); in a layer the residual-branch outputs (out_proj, fc2) get
    std width^-½·(2·layers)^-½ so the sum over layers keeps its scale (GPT-2's trick), q/k/v width^-½, fc1 (2·width)^-½.
    """
    d, n = cfg.hidden_size, cfg.num_hidden_layers
    for m in tower.modules():
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)
        if isinstance(m, CLIPAttention):
            for p in (m.q_proj, m.k_proj, m.v_proj):
                nn.init.normal_(p.weight, std=d ** -0.5)
            nn.init.normal_(m.out_proj.weight, std=d ** -0.5 * (2 * n) ** -0.5)
        elif isinstance(m, CLIPMLP):
            nn.init.normal_(m.fc1.weight, std=(2 * d) ** -0.5)
            nn.init.normal_(m.fc2.weight, std=d ** -0.5 * (2 * n) ** -0.5)
        elif isinstance(m, CLIPTextEmbeddings):
            nn.init.normal_(m.token_embedding.weight, std=0.02)
            nn.init.normal_(m.position_embedding.weight, std=0.01)
        elif isinstance(m, CLIPImageEmbeddings):
            nn.init.normal_(m.class_embedding, std=d ** -0.5)
            nn.init.normal_(m.position_embedding.weight, std=d ** -0.5)
