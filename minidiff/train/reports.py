"""Training, step 7 — reports: what a user watches while a run goes.

  train_log.jsonl          one JSON row per optimizer step: step, loss, lr, samples_per_s, grad_norm, epoch, time_s
  loss.png / lr.png        the loss per step with its moving average, and the learning rate (matplotlib)
  validation/step-N.png    a grid of fixed-seed images every --checkpoint-every steps (rows prompts, columns seeds)
  tensorboard/             event files (`--report-to tensorboard`, as diffusers' training scripts; needs tensorboard)
  a tqdm bar               with the loss, the LR and samples/s
"""
from __future__ import annotations

import json
import math
from contextlib import nullcontext
from pathlib import Path

import torch
from PIL import Image

from ..errors import SetupError
from ..files import atomic_write

REPORT_TO = ("none", "tensorboard")


def moving_average(values: list[float]) -> list[float]:
    """An exponential moving average with α = 20 / len (within [0.01, 0.3]): it spans about a tenth of the run."""
    if not values:
        return []
    alpha = min(0.3, max(0.01, 20 / len(values)))
    out, s = [], values[0]
    for v in values:
        s = (1 - alpha) * s + alpha * v
        out.append(s)
    return out


def _plot(path, xs, series, title: str, ylabel: str, size=(720, 360)) -> Path:
    """A line plot as a PNG of exactly `size` pixels. series: [(values, label, style kwargs)]."""
    import matplotlib
    matplotlib.use("Agg", force=False)                   # no display needed
    from matplotlib.figure import Figure
    dpi = 100
    fig = Figure(figsize=(size[0] / dpi, size[1] / dpi), dpi=dpi)
    ax = fig.add_subplot()
    for values, label, style in series:
        if len(xs) == 1:
            ax.plot(xs, values, "o", label=label, **style)
        else:
            ax.plot(xs, values, label=label, **style)
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if len(series) > 1:
        ax.legend(loc="upper right")
    fig.tight_layout()
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=dpi))


def draw_loss_curve(rows: list[dict], path, size=(720, 360)) -> Path:
    """The loss per optimizer step (grey) and its moving average (blue)."""
    pts = [(r["step"], r["loss"]) for r in rows if math.isfinite(r.get("loss", float("nan")))]
    xs, losses = [p[0] for p in pts], [p[1] for p in pts]
    series = [(losses, "loss per step", dict(color="0.65", lw=1)),
              (moving_average(losses), "moving average", dict(color="tab:blue", lw=2))] if pts else []
    return _plot(path, xs, series, "training loss", "loss", size)


def draw_lr_curve(rows: list[dict], path, size=(720, 360)) -> Path:
    """The learning rate of every optimizer step (warm-up, then the schedule)."""
    pts = [(r["step"], r["lr"]) for r in rows if "lr" in r]
    series = [([p[1] for p in pts], "lr", dict(color="tab:orange", lw=2))] if pts else []
    return _plot(path, [p[0] for p in pts], series, "learning rate", "lr", size)


def require_tensorboard():
    """torch's SummaryWriter class; SetupError (saying what to install) when the tensorboard package is missing.
    Called before a run starts, and by TensorBoard."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise SetupError("--report-to tensorboard needs the tensorboard package: pip install tensorboard "
                         "(or use --report-to none)") from None
    return SummaryWriter


class TensorBoard:
    """Scalars (and validation grids) as TensorBoard event files in OUT/tensorboard (torch.utils.tensorboard)."""

    def __init__(self, folder):
        self.writer = require_tensorboard()(log_dir=str(folder))

    def scalars(self, row: dict) -> None:
        for k, v in row.items():
            if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                self.writer.add_scalar(f"train/{k}", v, row["step"])

    def image(self, tag: str, image: Image.Image, step: int) -> None:
        import numpy as np
        self.writer.add_image(tag, np.asarray(image.convert("RGB")), step, dataformats="HWC")

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()


class Reporter:
    """Everything a run writes for people (rank 0 only): the JSONL log, plots, TensorBoard, validation grids."""

    def __init__(self, out, report_to: str = "none", start_step: int = 0, enabled: bool = True):
        if report_to not in REPORT_TO:
            raise ValueError(f"report_to must be one of {REPORT_TO}, got {report_to!r}")
        self.out, self.enabled = Path(out), enabled
        self.log_path = self.out / "train_log.jsonl"
        self.rows = prepare_log(self.log_path, start_step) if enabled else []
        self.log_file = open(self.log_path, "a", encoding="utf-8") if enabled else None
        self.tb = TensorBoard(self.out / "tensorboard") if enabled and report_to == "tensorboard" else None

    def log(self, row: dict) -> None:
        if not self.enabled:
            return
        self.log_file.write(json.dumps(row) + "\n")
        self.log_file.flush()
        self.rows.append(row)
        if self.tb:
            self.tb.scalars(row)

    def plots(self) -> None:
        if self.enabled and self.rows:
            draw_loss_curve(self.rows, self.out / "loss.png")
            draw_lr_curve(self.rows, self.out / "lr.png")

    def validation(self, grid: Image.Image, step: int) -> None:
        if not self.enabled:
            return
        atomic_write(self.out / "validation" / f"step-{step:06d}.png", lambda tmp: grid.save(tmp, format="PNG"))
        if self.tb:
            self.tb.image("validation", grid, step)

    def close(self) -> None:
        if self.log_file:
            self.log_file.close()
            self.log_file = None
        if self.tb:
            self.tb.close()
            self.tb = None


def prepare_log(path: Path, start: int) -> list[dict]:
    """Keep the log lines of steps <= start (a resumed run drops what it will redo), atomically; return them."""
    rows = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= start:
                rows.append(row)
    atomic_write(path, "".join(json.dumps(r) + "\n" for r in rows))
    return rows


@torch.no_grad()
def render_validation(pipe, prompts, seeds, resolution: int, steps: int = 25, guidance: float = 7.5,
                      scheduler: str | None = None, autocast=nullcontext) -> Image.Image:
    """One image per (prompt, seed) with fixed seeds, as a grid (compare.make_grid): rows = prompts, columns = seeds.
    autocast: the context to sample under (fp32 when it is nullcontext)."""
    from ..compare import make_grid, readable_cell
    was_training = pipe.unet.training
    pipe.unet.eval()
    rows = []
    with autocast():
        for prompt in prompts:
            rows.append([pipe.generate(prompt, steps=steps, guidance_scale=guidance, scheduler=scheduler, seed=s,
                                       height=resolution, width=resolution, progress=False)[0] for s in seeds])
    pipe.unet.train(was_training)
    return make_grid(rows, prompts, [f"seed {s}" for s in seeds], cell=readable_cell(max(rows[0][0].size)))


__all__ = ["REPORT_TO", "moving_average", "draw_loss_curve", "draw_lr_curve", "require_tensorboard", "TensorBoard",
           "Reporter", "prepare_log", "render_validation"]
