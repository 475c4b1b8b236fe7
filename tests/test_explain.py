"""minidiff.explain: DAAM's per-word cross-attention maps.

The oracle is DAAM's own algorithm run on diffusers: the processor below is castorini/daam's UNetCrossAttentionHooker
(daam/trace.py), its locator (daam/hook.py), compute_global_heat_map and compute_word_heat_map / expand_as
(daam/trace.py, daam/heatmap.py) and compute_token_merge_indices (daam/utils.py), rewritten for today's diffusers
Attention (the `daam` package pins diffusers 0.21 and needs spaCy). One deliberate change, documented in
minidiff/explain.py: DAAM's code upsamples to a fixed 64x64 (its SD-at-512 latent) — here, to the latent size."""
import math
from collections import defaultdict

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import minidiff
from minidiff import explain
from minidiff.schedulers import SCHEDULER_NAMES
from sd_fixtures import make_diffusers_pipe, write_diffusers


@pytest.fixture(scope="module")
def shapes():
    return minidiff.load()   # the embedded model: 32x32 images, 8x8 latents, cross-attention at 4x4 and 2x2


def _same(a: Image.Image, b: Image.Image) -> bool:
    return a.size == b.size and np.array_equal(np.asarray(a), np.asarray(b))


# ------------------------------------------------------------------------------------------ DAAM on diffusers
class DaamHooker:
    """daam.trace.UNetCrossAttentionHooker.__call__ as a diffusers attention processor: the attention of
    AttnProcessor, with the probabilities' conditional half added per (factor, layer, head)."""

    def __init__(self, heat_maps, layer_idx, latent_hw, context_size=77):
        self.heat_maps, self.layer_idx = heat_maps, layer_idx
        self.latent_hw, self.context_size = latent_hw, context_size

    @staticmethod
    def unravel(x):  # DAAM's _unravel_attn: [batch·heads, h·w, tokens] -> [heads, tokens, h, w], conditional half
        h = w = int(math.sqrt(x.size(1)))
        maps = []
        for map_ in x.permute(2, 0, 1):
            map_ = map_.view(map_.size(0), h, w)
            maps.append(map_[map_.size(0) // 2:])  # "Filter out unconditional"
        return torch.stack(maps, 0).permute(1, 0, 2, 3).contiguous()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        batch_size, sequence_length, _ = hidden_states.shape
        attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        query, key, value = (attn.head_to_batch_dim(t) for t in (query, key, value))
        attention_probs = attn.get_attention_scores(query, key, attention_mask)
        factor = int(math.sqrt(self.latent_hw // attention_probs.shape[1]))
        if attention_probs.shape[-1] == self.context_size and factor != 8:
            for head_idx, heatmap in enumerate(self.unravel(attention_probs)):
                key_ = (factor, self.layer_idx, head_idx)
                self.heat_maps[key_] = self.heat_maps[key_] + heatmap
        hidden_states = attn.batch_to_head_dim(torch.bmm(attention_probs, value))
        return attn.to_out[1](attn.to_out[0](hidden_states))


def daam_locate(unet):
    """daam.hook.UNetCrossAttentionLocator.locate (locate_middle_block=False): up blocks, then down blocks."""
    layers = []
    for block in [*unet.up_blocks, *unet.down_blocks]:
        if "CrossAttn" in type(block).__name__:
            layers += [tb.attn2 for st in block.attentions for tb in st.transformer_blocks]
    return layers


def daam_global_heat_map(heat_maps, x, n_tokens):
    """DiffusionHeatMapHooker.compute_global_heat_map: upsample, clamp, mean over (layer, head); keep <start>,
    the prompt's tokens and one <end>."""
    merges = [F.interpolate(m.unsqueeze(1), size=(x, x), mode="bicubic").clamp_(min=0) for m in heat_maps.values()]
    return torch.stack(merges, 0).mean(0)[:, 0][:n_tokens + 2]


def daam_word_map(tokenizer, prompt, maps, word):
    """GlobalHeatMap.compute_word_heat_map with compute_token_merge_indices."""
    tokens = tokenizer.tokenize(prompt.lower())
    search = tokenizer.tokenize(word.lower())
    starts = [x for x in range(len(tokens)) if tokens[x:x + len(search)] == search]
    idx = [i + s for s in starts for i in range(len(search))]
    return maps[[i + 1 for i in idx]].mean(0)


def daam_expand_as(heatmap, image):
    """WordHeatMap.expand_as (square images: its size=(image.size[0], image.size[1]) is then (H, W))."""
    im = F.interpolate(heatmap[None, None].float(), size=(image.size[0], image.size[1]), mode="bicubic")
    return ((im - im.min()) / (im.max() - im.min() + 1e-8)).squeeze()


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    from diffusers import StableDiffusionPipeline
    folder = write_diffusers(make_diffusers_pipe(0), tmp_path_factory.mktemp("sd") / "sd")
    dpipe = StableDiffusionPipeline.from_pretrained(str(folder), safety_checker=None)
    dpipe.set_progress_bar_config(disable=True)
    return minidiff.load(folder), dpipe


def test_maps_equal_daam_on_diffusers(pipes):
    pipe, dpipe = pipes
    prompt, seed, steps = "a red toucan and a red cellphone", 11, 4   # a two-token word, a word twice
    x = dpipe.unet.config.sample_size                                  # the latent side (DAAM: 64)
    heat_maps = defaultdict(lambda: 0.0)
    located = daam_locate(dpipe.unet)
    originals = [m.processor for m in located]
    for i, m in enumerate(located):
        m.set_processor(DaamHooker(heat_maps, i, x * x))
    try:
        ref = dpipe(prompt, num_inference_steps=steps, guidance_scale=7.5,
                    generator=torch.Generator().manual_seed(seed)).images[0]
    finally:
        for m, p in zip(located, originals):
            m.set_processor(p)
    ref_maps = daam_global_heat_map(heat_maps, x, len(dpipe.tokenizer.tokenize(prompt)))

    maps = explain.attention_maps(pipe, prompt, seed=seed, steps=steps, guidance_scale=7.5)
    assert len(maps.layers) == len(located) == 10 and maps.steps == steps + 1   # PNDM: steps + 1 U-Net calls
    ours = maps.heat_maps()[:ref_maps.shape[0]]
    # the two runs differ by float rounding (SDPA vs baddbmm-softmax, 1e-4 images): 1e-4 relative to the maps' scale
    torch.testing.assert_close(ours, ref_maps, rtol=1e-4, atol=1e-4 * ref_maps.abs().max().item())
    for word in ("red", "toucan", "cellphone", "a"):
        ref_word = daam_word_map(dpipe.tokenizer, prompt, ref_maps, word)
        torch.testing.assert_close(maps.latent(word), ref_word, rtol=1e-4, atol=1e-4 * ref_word.max().item())
        torch.testing.assert_close(maps.word(word), daam_expand_as(ref_word, ref), rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------- the one model
@pytest.mark.parametrize("scheduler", SCHEDULER_NAMES)
def test_recording_leaves_the_image_unchanged(shapes, scheduler):
    kw = dict(seed=3, steps=4, guidance_scale=5.0, scheduler=scheduler)
    maps = explain.attention_maps(shapes, "a blue triangle", **kw)
    assert _same(maps.image, shapes.generate("a blue triangle", progress=False, **kw)[0])
    assert all(m.controller is None for m in shapes.unet.modules() if hasattr(m, "controller"))  # detached


@pytest.mark.parametrize("case", ["no-guidance", "negative", "img2img", "inpaint", "non-square"])
def test_recording_leaves_the_image_unchanged_for_every_input(shapes, case):
    rng = np.random.default_rng(0)
    picture = Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    mask = Image.fromarray(np.pad(np.full((16, 16), 255, np.uint8), 8))
    kw = {"no-guidance": dict(guidance_scale=1.0), "negative": dict(negative_prompt="a red square"),
          "img2img": dict(image=picture, strength=0.6), "inpaint": dict(image=picture, mask_image=mask, strength=1.0),
          "non-square": dict(height=32, width=48)}[case]
    maps = explain.attention_maps(shapes, "a green circle", seed=1, steps=5, **kw)
    assert _same(maps.image, shapes.generate("a green circle", seed=1, steps=5, guidance_scale=kw.pop(
        "guidance_scale", 7.5), progress=False, **kw)[0])
    h, w = maps.latent_size
    assert maps.word("circle").shape == (maps.image.height, maps.image.width)
    assert maps.latent("circle").shape == (h, w) == (maps.image.height // 4, maps.image.width // 4)
    assert {tuple(r.shape[-2:]) for r in maps.layers.values()} == {(-(-h // 2), -(-w // 2)), (-(-h // 4), -(-w // 4))}


def test_fast_and_reference_kernels_give_the_same_maps(shapes):
    """The probe sees the projections of whichever kernels run: the maps agree within fp32 rounding (the U-Net's
    1e-4 of tests/test_speed.py, carried through 5 steps)."""
    kw = dict(seed=0, steps=5, guidance_scale=5.0)
    fast = explain.attention_maps(shapes, "a yellow square", **kw).heat_maps()
    shapes.fast = False
    try:
        ref = explain.attention_maps(shapes, "a yellow square", **kw).heat_maps()
    finally:
        shapes.fast = True
    torch.testing.assert_close(fast, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


# ---------------------------------------------------------------------------------------- words -> positions
def test_words_tokens_and_positions(shapes):
    """A word of several tokens is the mean of its tokens' maps; a word given twice, the mean of every occurrence.
    The expected positions come from the tokenizer's own tokens: <start>=0, a=1, red=2, tou=3, can=4, near=5, a=6,
    red=7, mini=8, diff=9."""
    prompt = "a red toucan near a red minidiff"
    assert shapes.tokenizer.convert_ids_to_tokens(shapes.tokenizer.encode(prompt)[1:-1]) == \
        ["a</w>", "red</w>", "tou", "can</w>", "near</w>", "a</w>", "red</w>", "mini", "diff</w>"]
    maps = explain.attention_maps(shapes, prompt, seed=0, steps=3)
    assert maps.words == ["a", "red", "toucan", "near", "a", "red", "minidiff"]
    D = maps.heat_maps()
    torch.testing.assert_close(maps.latent("toucan"), (D[3] + D[4]) / 2)
    torch.testing.assert_close(maps.latent("red"), (D[2] + D[7]) / 2)
    torch.testing.assert_close(maps.latent("minidiff"), (D[8] + D[9]) / 2)
    torch.testing.assert_close(maps.latent("Toucan Near"), (D[3] + D[4] + D[5]) / 3)   # DAAM lower-cases
    assert torch.equal(maps.token(0), D[0]) and maps.token(0).shape == maps.latent_size
    w = maps.word("toucan")
    assert w.shape == (32, 32) and w.min() == 0 and 0.999 < w.max() <= 1


def test_a_word_not_in_the_prompt_names_the_prompts_words(shapes):
    maps = explain.attention_maps(shapes, "a red circle", seed=0, steps=2)
    with pytest.raises(ValueError, match=r"'dog' is not a word of the prompt 'a red circle'; its words are: 'a', "
                                         r"'red', 'circle'"):
        maps.word("dog")
    with pytest.raises(ValueError, match="token position must be an int in \\[0, 76\\], got 77"):
        maps.token(77)
    with pytest.raises(TypeError, match="one prompt"):
        explain.attention_maps(shapes, ["a", "b"])


def test_long_prompt_maps_every_chunk(shapes):
    """77 tokens: chunk 0 holds 75 of them at positions 1..75, chunk 1 (from position 77, its <start>) the rest."""
    prompt = " ".join(["red"] * 76) + " circle"
    maps = explain.attention_maps(shapes, prompt, seed=0, steps=2)
    assert all(r.shape[1] == 2 * 77 for r in maps.layers.values()) and len(maps.words) == 77
    assert maps.positions("circle") == [79] and maps.positions("red") == [*range(1, 76), 78]
    assert torch.equal(maps.latent("circle"), maps.heat_maps()[79])


def test_weighted_lora_and_textual_inversion_words(tmp_path):
    from minidiff.formats.embeddings import save_embedding
    from minidiff.lora import inject_lora
    pipe = minidiff.load()
    save_embedding(tmp_path / "spot.safetensors", "<spot>", torch.randn(2, pipe.text_encoder.config.hidden_size))
    pipe.load_embedding(tmp_path / "spot.safetensors")
    for layer in inject_lora(pipe.unet, rank=2).values():   # B != 0: the LoRA changes the cross-attention
        torch.nn.init.normal_(layer.lora_B.weight, std=0.05)
    prompt = "a (red:1.3) <spot>"
    maps = explain.attention_maps(pipe, prompt, seed=0, steps=3)
    assert _same(maps.image, pipe.generate(prompt, seed=0, steps=3, guidance_scale=7.5, progress=False)[0])
    assert maps.words == ["a", "red", "<spot>"]                  # the weight syntax is not a word
    assert maps.positions("<spot>") == [3, 4]                     # a 2-vector embedding: two positions
    torch.testing.assert_close(maps.latent("<spot>"), maps.heat_maps()[3:5].mean(0))


# ---------------------------------------------------------------------------------------- memory
def _allocated(fn):
    """(peak, retained) bytes of CPU tensors allocated while fn() runs, from torch.profiler's record of every
    allocation (+bytes) and free (-bytes) of the allocator in time order: the running sum's maximum and its final
    value; -> (peak, retained, result)."""
    import itertools

    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    memory = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    running = list(itertools.accumulate(n for _, n in memory))
    return max(running), running[-1], result


def test_memory_does_not_grow_with_the_steps(shapes):
    """DAAM's sums are accumulated as the steps run: after 50 steps the recorder holds exactly what it holds after 5
    (layers x heads x 77 positions x h_l x w_l floats), and the allocator's peak during the run is no higher."""
    def run(steps):
        return lambda: explain.attention_maps(shapes, "a red circle", seed=0, steps=steps, scheduler="ddim")
    run(5)()   # warm-up: caches built on first use (stacked weights, packed convolutions) are not counted
    peak5, kept5, maps5 = _allocated(run(5))
    peak50, kept50, maps50 = _allocated(run(50))
    sizes = [tuple(r.shape[-2:]) for r in maps5.layers.values()]
    assert sorted(sizes) == [(2, 2)] * 3 + [(4, 4)] * 3
    held = sum(4 * 77 * h * w * 4 for h, w in sizes)   # 4 heads, 77 positions, float32
    assert sum(r.nbytes for r in maps5.layers.values()) == sum(r.nbytes for r in maps50.layers.values()) == held
    assert maps50.steps == 50 and kept50 == kept5
    # keeping even one step's weights of the smallest layer (4 heads x 2x2 pixels x 77) per step would add
    # 45 x 4928 bytes to the 50-step peak; the bound allows less than one such copy in all
    assert peak50 < peak5 + 4 * 4 * 77 * 4, (peak5, peak50)


# ---------------------------------------------------------------------------------------- the controller
def test_a_controller_may_replace_the_weights(shapes):
    """Returning probabilities replaces them: the layer's own (returned unchanged) give the image within the rounding
    of SDPA vs the written-out softmax; uniform weights give another image."""
    layers = explain.cross_attention_layers(shapes.unet, explain.ALL_LAYERS)
    kw = dict(seed=2, steps=4, guidance_scale=5.0, output="tensor", progress=False)
    base = shapes.generate("a purple square", **kw)
    with explain.attached(lambda layer, p: p, layers):
        same = shapes.generate("a purple square", **kw)
        with pytest.raises(RuntimeError, match="already attached"):
            with explain.attached(lambda layer, p: None, layers):
                pass
    with explain.attached(lambda layer, p: torch.full_like(p, 1 / p.shape[-1]), layers):
        uniform = shapes.generate("a purple square", **kw)
    torch.testing.assert_close(same, base, rtol=1e-4, atol=1e-4)
    assert (uniform - base).abs().max() > 0.05


# ---------------------------------------------------------------------------------------- the command line
def test_cli_attention_maps_writes_one_panel_per_word(shapes, tmp_path):
    import json

    from minidiff.cli import main
    from minidiff.compare import grid_cell
    out, grid_path = tmp_path / "out.png", tmp_path / "maps.png"
    assert main(["generate", "a red circle", "--seed", "0", "--steps", "4", "--out", str(out),
                 "--attention-maps", str(grid_path)]) == 0
    written = Image.open(grid_path)
    layout = json.loads(written.text["minidiff_grid"])
    maps = explain.attention_maps(shapes, "a red circle", seed=0, steps=4)
    assert layout["words"] == maps.words == ["a", "red", "circle"] and layout["cols"] == 1 + 3
    expected = maps.grid()
    assert np.array_equal(np.asarray(written.convert("RGB")), np.asarray(expected))
    panels = [np.asarray(grid_cell(expected, 0, c)) for c in range(4)]
    assert all(not np.array_equal(panels[0], p) for p in panels[1:])   # each word's panel is an overlay
    image = Image.open(out)   # the picture itself is generate's (enlarged for viewing)
    assert _same(image.resize((32, 32), Image.NEAREST), shapes.generate("a red circle", seed=0, steps=4,
                                                                        progress=False)[0])
