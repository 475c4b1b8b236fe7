"""minidiff.train.state: single state files (the tiny recipe's stages) written atomically and read back without
running pickle, and the RNG states a checkpoint keeps. (Whole checkpoints and exact resumption: test_finetune.py's
resume test and tests/test_finetune_kill.py.)"""
import random

import numpy as np
import pytest
import torch

from minidiff.train.state import load_state, rng_state, save_state, set_rng_state


class NotATensor:
    pass


def test_state_file_round_trip_is_atomic_and_runs_no_pickle(tmp_path):
    path = tmp_path / "vae.pt"
    assert load_state(path) is None                          # no file yet: a fresh start
    save_state({"model": {"w": torch.arange(3.0)}, "step": 7, "done": False, "last": {"loss": 0.5}}, path)
    state = load_state(path)
    assert state["step"] == 7 and torch.equal(state["model"]["w"], torch.arange(3.0)) and state["last"] == {"loss": 0.5}
    with pytest.raises(Exception):                           # a write that fails half-way ...
        save_state({"step": 8, "fn": lambda: None}, path)
    assert load_state(path)["step"] == 7                     # ... leaves the old file, and no temporary beside it
    assert [p.name for p in tmp_path.iterdir()] == ["vae.pt"]
    torch.save({"object": NotATensor()}, tmp_path / "pickled.pt")
    with pytest.raises(Exception, match="[Ww]eights only load failed"):
        load_state(tmp_path / "pickled.pt")                  # weights_only=True: no class of the file is built


def test_rng_state_round_trip():
    state = rng_state()
    first = (random.random(), np.random.rand(3), torch.rand(3))
    set_rng_state(state)
    again = (random.random(), np.random.rand(3), torch.rand(3))
    assert first[0] == again[0] and np.array_equal(first[1], again[1]) and torch.equal(first[2], again[2])
