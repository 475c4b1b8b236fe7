"""The tiny text-to-image recipe (minidiff.recipes.tiny) and the committed model it produced (weights/minidiff-shapes).

* one stage of the recipe (train_stage): exact resumption after an interruption;
* `minidiff train-tiny --quick` end to end into a temporary folder, stopped after a stage and resumed, then loaded
  with minidiff.load and sampled;
* the committed model: loads with no path, draws 32×32 images, and reaches the quality targets on the pixel
  detector (≥ 90% of images right for the 15 trained pairs, ≥ 60% for the 3 held-out pairs)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from minidiff.recipes.tiny import Recipe, train_stage

ROOT = Path(__file__).resolve().parent.parent
COMMITTED = ROOT / "weights" / "minidiff-shapes"


# ------------------------------------------------------------------------------------------------ one stage
def test_interrupted_stage_resumes_to_the_same_weights(tmp_path):
    """A stage killed mid-way and resumed from its checkpoint ends with the same weights as one uninterrupted run:
    the checkpoint holds model + optimizer + step, and step n's batch comes from a generator seeded by (stage, n)."""
    def make():
        torch.manual_seed(0)
        return torch.nn.Linear(3, 2)

    def step_fn_for(model, stop_at=None):
        calls = {"n": 0}

        def step_fn(g):
            if stop_at is not None and calls["n"] == stop_at:
                raise KeyboardInterrupt
            calls["n"] += 1
            x = torch.randn(8, 3, generator=g)
            return ((model(x) - x[:, :2]) ** 2).mean(), {}
        return step_fn

    a = make()
    train_stage("toy", a, list(a.parameters()), 12, 1e-2, step_fn_for(a), tmp_path / "a", False, 0, 3, progress=False)
    b = make()
    with pytest.raises(KeyboardInterrupt):
        train_stage("toy", b, list(b.parameters()), 12, 1e-2, step_fn_for(b, stop_at=7), tmp_path / "b", False, 0, 3,
                    save_every=0.0, progress=False)
    saved = torch.load(tmp_path / "b" / "toy.pt", weights_only=True)
    assert saved["step"] == 7 and not saved["done"]
    c = make()                                                   # a fresh process would start from scratch weights
    rec = train_stage("toy", c, list(c.parameters()), 12, 1e-2, step_fn_for(c), tmp_path / "b", True, 0, 3,
                      progress=False)
    assert rec["step"] == 12
    for p, q in zip(a.parameters(), c.parameters()):
        assert torch.allclose(p, q, atol=1e-7)


# ------------------------------------------------------------------------------------------------ train-tiny --quick
def _cli(*args):
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    return subprocess.run([sys.executable, "-m", "minidiff", "train-tiny", *args, "--no-progress"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)


def test_train_tiny_quick_stops_resumes_and_loads(tmp_path):
    import minidiff
    out = tmp_path / "m"
    work = tmp_path / "m.work"
    r = _cli("--out", str(out), "--quick", "--stop-after", "clip")
    assert r.returncode == 0, r.stderr[-3000:]
    assert not out.exists()
    vae_state = torch.load(work / "vae.pt", weights_only=True)
    assert vae_state["done"] and vae_state["step"] == Recipe.quick().vae_steps
    assert torch.load(work / "clip.pt", weights_only=True)["done"]
    assert not (work / "unet.pt").exists()
    mtime = (work / "vae.pt").stat().st_mtime_ns

    r = _cli("--out", str(out), "--quick", "--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    assert (work / "vae.pt").stat().st_mtime_ns == mtime            # the finished stage was not run again
    assert torch.load(work / "unet.pt", weights_only=True)["done"]
    for f in ("model_index.json", "unet/diffusion_pytorch_model.safetensors", "vae/config.json",
              "text_encoder/model.safetensors", "tokenizer/vocab.json", "MODEL_CARD.md", "metrics.json"):
        assert (out / f).is_file(), f
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"vae", "clip", "latents", "unet", "save", "eval"} <= set(metrics["stages"])
    card = (out / "MODEL_CARD.md").read_text()
    assert "minidiff train-tiny --out" in card and "\nminidiff shapes-eval\n" in card     # the reproduce commands

    pipe = minidiff.load(out)
    # the shipped VAE is the one the first run trained, with the scaling factor measured on its latents
    for k, v in pipe.vae.state_dict().items():
        assert torch.equal(v, vae_state["model"][k]), k
    sf = torch.load(work / "latents.pt", weights_only=True)["scaling_factor"]
    assert pipe.vae.config.scaling_factor == pytest.approx(sf)
    images = pipe.generate("a blue triangle", seed=0, steps=2, progress=False)
    assert images[0].size == (32, 32)


# ------------------------------------------------------------------------------------------------ the committed model
@pytest.fixture(scope="module")
def committed():
    import minidiff
    assert (COMMITTED / "model_index.json").is_file(), "weights/minidiff-shapes is missing (it is committed)"
    return minidiff.load()


def test_committed_model_fits_the_budget():
    files = [p for p in COMMITTED.rglob("*") if p.is_file()]
    assert files, "weights/minidiff-shapes is missing (it is committed)"
    assert sum(p.stat().st_size for p in files) <= 30 * 1024 * 1024
    assert all(p.suffix != ".bin" for p in files)                     # safetensors only
    assert (COMMITTED / "MODEL_CARD.md").is_file()


def test_committed_model_generates_32px(committed):
    images = committed.generate("a blue triangle", seed=0, progress=False)  # the pipeline's defaults
    assert len(images) == 1 and images[0].size == (32, 32) and images[0].mode == "RGB"


def test_committed_model_reaches_quality_targets(committed):
    """All 18 prompts × 8 seeds with the documented protocol (shapes_eval.EVAL: DDIM, 20 steps, guidance 5)."""
    from minidiff.shapes_eval import evaluate, format_report
    r = evaluate(committed)
    print(format_report(r))
    assert r["settings"]["n_images"] == 144
    assert r["trained"] >= 0.90, format_report(r)
    assert r["held_out"] >= 0.60, format_report(r)
