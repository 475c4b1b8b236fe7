"""`minidiff finetune --train lora --lora-preset attn-only|attn-mlp|full` (issue #27): what each preset trains, exact
resume and two processes with a conv preset and the text encoder, both exported layouts in diffusers with minidiff's
image, and the flags' errors. (The CLI run, with resume: tests/test_cli.py.)"""
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import minidiff
from minidiff.train import FinetuneConfig, train
from minidiff.lora import LORA_PRESETS, apply_lora, inject_lora
from tiny_runs import EQUIV, cfg_for, read_log

CONV = dict(lora_preset="full", lora_rank=4, lora_alpha=2.0, lora_conv_rank=2, lora_conv_alpha=4.0,
            lora_text_encoder=True)


def _changed(a, b) -> set[str]:
    return {k for k, v in a.state_dict().items() if not torch.equal(v, b.state_dict()[k])}


def _weights(paths) -> set[str]:
    return {f"{p}.weight" for p in paths}


@pytest.mark.parametrize("preset", list(LORA_PRESETS))
def test_each_preset_trains_its_layers_and_exports_them(tmp_path, preset):
    """On the embedded model (default resolution, validation on): the merged model differs from the base in exactly
    the preset's layers (U-Net and, with --lora-text-encoder, the text encoder's), and both separate files hold exactly
    those layers and give the merged model."""
    from minidiff.data.shapes import make_concept_dataset
    out = tmp_path / "out"
    data = make_concept_dataset(tmp_path / "data", concept="cross", n=8, seed=0)
    train(FinetuneConfig(data=str(data), output=str(out), steps=2, batch_size=2, lr=1e-2, validation_steps=2,
                         progress=False, train="lora", lora_preset=preset, lora_rank=2, lora_text_encoder=True,
                         lora_export="separate"))
    tuned, base = minidiff.load(out), minidiff.load()
    layout = minidiff.load()   # a second copy, to list where the preset puts LoRA
    want_unet = set(inject_lora(layout.unet, 2, targets=LORA_PRESETS[preset].unet))
    want_text = set(inject_lora(layout.text_encoder, 2, targets=LORA_PRESETS[preset].text_encoder))
    assert _changed(tuned.unet, base.unet) == _weights(want_unet)
    assert _changed(tuned.text_encoder, base.text_encoder) == _weights(want_text)
    assert not _changed(tuned.vae, base.vae)
    for name in ("lora.safetensors", "lora_kohya.safetensors"):
        applied = apply_lora(minidiff.load(), out / name)
        for net in ("unet", "text_encoder"):
            mine, ref = getattr(applied, net).state_dict(), getattr(tuned, net).state_dict()
            for k, v in ref.items():
                torch.testing.assert_close(mine[k], v, rtol=0, atol=1e-6)
    kohya = load_file(str(out / "lora_kohya.safetensors"))
    assert len([k for k in kohya if k.endswith(".alpha")]) == len(want_unet) + len(want_text)


def test_resume_with_a_conv_preset_gives_the_same_lora(tiny, tmp_path):
    """Preset full with its own conv rank and α and the text encoder's LoRA: stopped after step 3 (checkpoint at 2)
    and resumed, the run ends with the LoRA of one that never stopped."""
    kw = dict(steps=4, checkpoint_every=2, train="lora", lora_export="separate", lr=1e-2, random_flip=True,
              caption_dropout=0.3, warmup_steps=1, lr_schedule="cosine", **CONV)
    a, b = tmp_path / "a", tmp_path / "b"
    train(cfg_for(tiny, a, **kw))
    assert not train(cfg_for(tiny, b, max_steps_this_run=3, **kw))["finished"]
    assert train(cfg_for(tiny, b, resume=True, **kw))["finished"]
    la, lb = load_file(str(a / "lora.safetensors")), load_file(str(b / "lora.safetensors"))
    assert la.keys() == lb.keys() and any(k.startswith("text_encoder.") for k in la)
    assert max(float((la[k] - lb[k]).abs().max()) for k in la) <= 1e-6
    assert any(v.shape[0] == 2 and v.dim() == 4 and v.shape[-1] == 3 for v in la.values())   # conv rank 2 (3×3 A)
    # what trains is part of the run: resuming with another preset or conv rank is refused
    with pytest.raises(ValueError, match="--lora-preset"):
        train(cfg_for(tiny, b, resume=True, **{**kw, "steps": 5, "lora_preset": "attn-mlp", "lora_conv_rank": None,
                                               "lora_conv_alpha": None}))
    with pytest.raises(ValueError, match="--lora-conv-rank"):
        train(cfg_for(tiny, b, resume=True, **{**kw, "steps": 5, "lora_conv_rank": 3}))


def test_both_exported_layouts_give_minidiffs_image_in_diffusers(tmp_path):
    """A full-preset run (conv rank and α of their own, text encoder too) on a diffusers-made model: diffusers'
    load_lora_weights of OUT/lora.safetensors and of OUT/lora_kohya.safetensors draws the image minidiff draws with the
    merged OUT."""
    from interop_helpers import TOL, load_diffusers, ours, shared_folder, theirs
    from tiny_runs import write_tiny_dataset
    pytest.importorskip("peft")
    folder = shared_folder()
    out = tmp_path / "out"
    train(FinetuneConfig(model=str(folder), data=str(write_tiny_dataset(tmp_path / "data")), output=str(out),
                         steps=2, batch_size=2, lr=3e-2, resolution=16, validation_steps=2, progress=False,
                         train="lora", lora_export="separate", **CONV))
    image = ours(minidiff.load(out))
    assert (image - ours(minidiff.load(folder))).abs().max() > 0.05   # the fine-tune changed the image
    for name in ("lora.safetensors", "lora_kohya.safetensors"):
        dpipe = load_diffusers(folder)
        dpipe.load_lora_weights(str(out / name))
        torch.testing.assert_close(theirs(dpipe), image, **TOL)


def test_two_processes_match_one_with_a_conv_preset(tiny, tmp_path):
    """torchrun with 2 processes, preset full and the text encoder's LoRA (its gradients averaged outside DDP): the
    LoRA of one process taking the whole global batch."""
    one, two = tmp_path / "one", tmp_path / "two"
    kw = dict(steps=2, batch_size=4, checkpoint_every=2, train="lora", lora_export="separate", **CONV, **EQUIV)
    train(cfg_for(tiny, one, **kw))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "minidiff", "finetune", "--model", tiny["model"], "--data", tiny["data"], "--output", str(two),
           "--steps", "2", "--batch-size", "2", "--lr", "1e-3", "--resolution", "16", "--checkpoint-every", "2",
           "--validation-steps", "2", "--no-progress", "--adam-eps", str(EQUIV["adam_eps"]), "--train", "lora",
           "--lora-export", "separate", "--lora-preset", "full", "--lora-rank", "4", "--lora-alpha", "2",
           "--lora-conv-rank", "2", "--lora-conv-alpha", "4", "--lora-text-encoder"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        [os.path.dirname(os.path.dirname(os.path.abspath(__file__))), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    la, lb = load_file(str(one / "lora.safetensors")), load_file(str(two / "lora.safetensors"))
    assert la.keys() == lb.keys()
    worst = max(float((la[k] - lb[k]).abs().max()) for k in la)
    moved = max(float(v.abs().max()) for k, v in la.items() if ".lora_B." in k)
    assert worst <= 1e-5 < moved, (worst, moved)
    assert [r["step"] for r in read_log(two)] == [1, 2]


def test_flag_errors(tiny, tmp_path):
    out = tmp_path / "x"
    with pytest.raises(ValueError, match="lora_preset must be one of"):
        cfg_for(tiny, out, train="lora", lora_preset="everything")
    with pytest.raises(ValueError, match=r"lora_conv_rank must be an int >= 1 or None, got 0 \(--lora-conv-rank\)"):
        cfg_for(tiny, out, train="lora", lora_preset="full", lora_conv_rank=0)
    with pytest.raises(ValueError, match=r"lora_alpha must be a finite number > 0 or None, got 0.0 \(--lora-alpha\)"):
        cfg_for(tiny, out, train="lora", lora_alpha=0.0)
    with pytest.raises(ValueError, match="lora_conv_rank .* needs lora_preset='full' .*preset 'attn-mlp' puts no"):
        cfg_for(tiny, out, train="lora", lora_preset="attn-mlp", lora_conv_rank=2)
    with pytest.raises(ValueError, match="lora_conv_alpha .* needs train='lora' \\(--train lora\\), got train='unet'"):
        cfg_for(tiny, out, train="unet", lora_conv_alpha=2.0)
