"""minidiff.train.trainable: what trains. --train last-up-blocks changes only the last N up-blocks, and checkpoints
only them. (LoRA: tests/test_lora.py; textual inversion: tests/test_textual_inversion.py; the whole U-Net: every run
of tests/test_finetune.py.)"""
import pytest
import torch
from safetensors.torch import load_file

import minidiff
from minidiff.train import train
from tiny_runs import cfg_for


def test_last_up_blocks_trains_only_those(tiny, tmp_path):
    out = tmp_path / "out"
    train(cfg_for(tiny, out, steps=2, train="last-up-blocks", up_blocks=1))
    before, after = minidiff.load(tiny["model"]).unet.state_dict(), minidiff.load(out).unet.state_dict()
    n_up = max(int(k.split(".")[1]) for k in before if k.startswith("up_blocks.")) + 1
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith(f"up_blocks.{n_up - 1}.") for k in changed)
    trained = load_file(str(out / "checkpoints" / "step-000002" / "trainable.safetensors"))
    assert all(k.startswith(f"up_blocks.{n_up - 1}.") for k in trained)
    with pytest.raises(ValueError, match="--up-blocks"):
        train(cfg_for(tiny, tmp_path / "bad", steps=1, train="last-up-blocks", up_blocks=9))
