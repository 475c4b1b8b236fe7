"""Chapter 12.3 — the exponential moving average (EMA) of the weights.

SGD's weights jitter around a good solution from step to step; an average of the recent weights sits nearer its
centre and usually samples cleaner images (Polyak & Juditsky 1992; used for every Stable Diffusion release, whose
CompVis files carry it as `model_ema.*`). After every optimizer step:

    θ_ema ← d · θ_ema + (1 − d) · θ          i.e.  θ_ema ← θ_ema − (1 − d)(θ_ema − θ)

With d = 0.9999 the average spans ~1/(1−d) = 10,000 steps. At the start θ_ema would be stuck near the initial
weights for thousands of steps, so the decay is warmed up exactly as diffusers' EMAModel does by default:

    d_0 = 0 (the first update copies θ),   d_n = min(d, (1 + n) / (10 + n))   n = the updates made before this one

(2/11 ≈ 0.18 at the second update, 0.5 at the 9th, 0.9 at the 81st...). The shadow copy may live on the CPU
(`device="cpu"`) to spare GPU memory (3.4 GB for SD v1.4's U-Net in fp32) at the price of a device-to-host copy per step.

    ema = EMA(trainable_params, decay=0.9999)
    ...optimizer.step(); ema.update(trainable_params)
    with ema.swapped_in(trainable_params): render validation images
    ema.copy_to(trainable_params)            # before export
"""
from __future__ import annotations

from contextlib import contextmanager

import torch


class EMA:
    """A shadow copy of some parameters, averaged after every optimizer step.

    params: a dict {name: Parameter} (the names key the state_dict) or a list of Parameters.
    decay:  d, the target decay; device: where the shadow lives (None = with the parameters)."""

    def __init__(self, params, decay: float = 0.9999, device=None):
        named = self._named(params)
        self.decay = float(decay)
        self.num_updates = 0
        self.device = None if device is None else torch.device(device)
        self.shadow = {n: p.detach().to(self.device or p.device, torch.float32, copy=True) for n, p in named.items()}

    @staticmethod
    def _named(params) -> dict:
        return dict(params) if isinstance(params, dict) else {str(i): p for i, p in enumerate(params)}

    def current_decay(self) -> float:
        """d_n for the coming update: 0 for the first, then min(d, (1 + n) / (10 + n))."""
        n = self.num_updates
        return 0.0 if n == 0 else min(self.decay, (1 + n) / (10 + n))

    @torch.no_grad()
    def update(self, params) -> None:
        """θ_ema ← θ_ema − (1 − d_n)(θ_ema − θ) for every parameter."""
        d = self.current_decay()
        named = self._named(params)
        shadow = [self.shadow[name] for name in named]
        current = [p.detach().to(s.device, s.dtype) for s, p in zip(shadow, named.values())]
        # θ_ema + (1 − d)(θ − θ_ema), the same update written as a lerp: in place and for all tensors at once (a few
        # kernel launches instead of three per tensor: ~2,000 for the SD U-Net, each costing the GPU a few µs)
        torch._foreach_lerp_(shadow, current, 1.0 - d)
        self.num_updates += 1

    @torch.no_grad()
    def copy_to(self, params) -> None:
        """Overwrite the parameters with the averaged weights."""
        for name, p in self._named(params).items():
            p.copy_(self.shadow[name].to(p.device, p.dtype))

    @contextmanager
    def swapped_in(self, params):
        """Use the averaged weights inside the `with` block, the trained ones again after it (kept meanwhile in CPU
        memory, so swapping needs no extra GPU memory)."""
        named = self._named(params)
        saved = {n: p.detach().to("cpu", copy=True) for n, p in named.items()}
        self.copy_to(named)
        try:
            yield
        finally:
            with torch.no_grad():
                for n, p in named.items():
                    p.copy_(saved[n])

    def state_dict(self) -> dict:
        return {"decay": self.decay, "num_updates": self.num_updates, "shadow": dict(self.shadow)}

    def load_state_dict(self, state: dict) -> None:
        missing = set(self.shadow) ^ set(state["shadow"])
        if missing:
            raise KeyError(f"EMA state does not match the parameters (differing names, e.g. {sorted(missing)[:3]})")
        self.decay, self.num_updates = float(state["decay"]), int(state["num_updates"])
        for n, t in state["shadow"].items():
            self.shadow[n].copy_(t)


__all__ = ["EMA"]
