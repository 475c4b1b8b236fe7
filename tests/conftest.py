import os

import pytest
import torch

from tiny_runs import write_tiny_dataset, write_tiny_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _threads(request):
    """Tiny models are latency-bound: one thread avoids OpenMP's hand-offs, which made small training loops ~40x
    slower with 2 threads on a busy 2-core machine (measured: 143 s vs 3.6 s). Full-size checks (`slow`) use every core."""
    n = torch.get_num_threads()
    torch.set_num_threads((os.cpu_count() or 1) if request.node.get_closest_marker("slow") else 1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {"model": str(write_tiny_model(root / "model")), "data": str(write_tiny_dataset(root / "data")),
            "root": root}
