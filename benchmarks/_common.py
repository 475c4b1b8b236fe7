"""Shared by the benchmark scripts: the machine and software a number was measured on, interleaved timing, peak
memory, and appending a result section to docs/benchmarks.md."""
from __future__ import annotations

import datetime
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "benchmarks.md"
sys.path.insert(0, str(REPO))


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def cpu_flags() -> set[str]:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def memory_gib() -> float | None:
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal"):
                return int(line.split()[1]) / 2 ** 20
    except OSError:
        pass
    return None


def load_average() -> str:
    try:
        return " / ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def git_commit() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True,
                               text=True, timeout=10).stdout.strip()
        return rev + (" (+ uncommitted changes)" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# the CPU features the CPU numbers depend on: oneDNN / OpenVINO pick their kernels by them (bf16 runs natively only with
# avx512_bf16 or AMX; without them a bf16 hint or a bf16 matmul is emulated or ignored)
ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


def isa_summary() -> str:
    """'avx2 yes, avx512f yes, avx512_bf16 yes, amx_bf16 no, amx_tile no' (from /proc/cpuinfo)."""
    flags = cpu_flags()
    if not flags:
        return "CPU flags unknown"
    return ", ".join(f"{f} {'yes' if f in flags else 'no'}" for f in ISA_FLAGS)


def machine() -> str:
    import torch
    mem = memory_gib()
    parts = [f"{cpu_model()}, {os.cpu_count()} cores ({isa_summary()})",
             f"{mem:.0f} GiB RAM" if mem else "", f"torch threads: {torch.get_num_threads()}"]
    if torch.cuda.is_available():
        parts.append("GPU: " + ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())))
    return "; ".join(p for p in parts if p)


def versions() -> str:
    import torch
    out = [f"python {platform.python_version()}", f"torch {torch.__version__}"]
    for name in ("diffusers", "transformers", "bitsandbytes", "openvino"):
        try:
            out.append(f"{name} {__import__(name).__version__.split('-')[0]}")   # openvino: '2026.4.1-22982-...'
        except ImportError:
            pass
    if torch.version.cuda:
        out.append(f"CUDA {torch.version.cuda}")
    out.append(f"minidiff {git_commit()}")
    return ", ".join(out)


def command_line() -> str:
    return "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0], REPO), *sys.argv[1:]])


def interleaved(fns: dict, n: int, warmup: int = 1, sync=None, progress: bool = True) -> dict:
    """Time every callable n times, round-robin (a, b, c, a, b, c, ...), so that a change in the machine's load hits
    all of them alike. -> {name: {"wall": [s, ...], "cpu": [s, ...]}} (cpu = this process's CPU time, all threads)."""
    for _ in range(warmup):
        for f in fns.values():
            f()
            if sync:
                sync()
    out = {k: {"wall": [], "cpu": []} for k in fns}
    for i in range(n):
        for k, f in fns.items():
            w0, c0 = time.perf_counter(), time.process_time()
            f()
            if sync:
                sync()
            out[k]["wall"].append(time.perf_counter() - w0)
            out[k]["cpu"].append(time.process_time() - c0)
        if progress:
            print(f"  round {i + 1}/{n}: " + ", ".join(f"{k} {v['wall'][-1]:.2f}s" for k, v in out.items()), flush=True)
    return out


class PeakMemory:
    """`with PeakMemory(device) as m: ...` then m.peak_bytes: the peak memory of the block (None: not measurable).

    CUDA: torch.cuda.max_memory_allocated (the caching allocator's tensors). CPU: the process's peak resident set size
    (Linux VmHWM), which counts the weights already loaded too, so compare it with `base_bytes`, the resident size at
    entry. VmHWM is the peak of the process's whole life unless it is reset at entry (writing 5 to
    /proc/self/clear_refs); where that reset fails (not Linux, or not allowed) the peak of the block cannot be told
    from an older one, and peak_bytes is None rather than a number that belongs to something else."""

    def __init__(self, device="cpu"):
        import torch
        self.device = torch.device(device)
        self.peak_bytes = self.base_bytes = None
        self._reset = False

    def __enter__(self):
        import torch
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base_bytes = torch.cuda.memory_allocated(self.device)
            self._reset = True
        else:
            self.base_bytes = _proc_status("VmRSS")
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
                self._reset = _proc_status("VmHWM") is not None
            except OSError:
                self._reset = False
        return self

    def __exit__(self, *exc):
        import torch
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device)
        elif self._reset:
            self.peak_bytes = _proc_status("VmHWM")
        return False


def _proc_status(field: str):
    """A /proc/self/status field in bytes (VmRSS, VmHWM), or None where there is none."""
    try:
        with open("/proc/self/status") as f:
            m = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M)
        return int(m.group(1)) * 1024 if m else None
    except OSError:
        return None


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def md_table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def append_section(title: str, table: str, notes: list[str] | None = None, load_before: str | None = None) -> str:
    """Append a dated section (machine, versions, command, load, the table, notes) to docs/benchmarks.md."""
    now = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    lines = [f"### {title} — {now}", "",
             f"- machine: {machine()}",
             f"- versions: {versions()}",
             f"- command: `{command_line()}`"]
    if load_before is not None:
        lines.append(f"- load average (1/5/15 min) before / after: {load_before} → {load_average()}")
    lines += ["", table, ""]
    lines += [f"- {n}" for n in notes or []]
    text = "\n".join(lines).rstrip() + "\n\n"
    DOC.parent.mkdir(parents=True, exist_ok=True)
    if not DOC.exists():
        DOC.write_text("# Benchmarks\n\n")
    with open(DOC, "a") as f:
        f.write(text)
    print(f"appended to {DOC.relative_to(REPO)}")
    return text


def write_block(path, block: str, begin: str, end: str) -> None:
    """Put `block` (which starts with the marker `begin` and ends with `end`) into the markdown file `path`: it
    replaces the text between the markers when they are there, else it is appended. Written to a temporary file
    and renamed, so the doc is never half written."""
    path = Path(path)
    text = path.read_text() if path.exists() else ""
    if begin in text and end in text:
        text = text[:text.index(begin)] + block + text[text.index(end) + len(end):]
    else:
        text = text + ("\n" if text and not text.endswith("\n") else "") + block + "\n"
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
