"""Execute notebooks in place and store their outputs (what `make notebooks` runs).

    python notebooks/execute.py                      # every notebooks/*.ipynb
    python notebooks/execute.py 06 10d 07b_where_words_land.ipynb      # some of them: number, name or file name

Each notebook runs top to bottom in a fresh kernel, in notebooks/ (so the notebooks' "../weights" paths and
notebooks/matplotlibrc apply), with this checkout first on PYTHONPATH (as tests/test_notebooks.py runs them). Its
cells are seeded, so a re-run draws the same pictures. The stored notebook is what a reader sees on the repository
page, so it is made stable and checkable:

  * every code cell's metadata gets `source_sha256`, the SHA-256 of the source it was executed from (UTF-8);
    tests/test_notebooks_stored.py fails when a cell's source no longer matches it (its outputs are stale);
  * execution counts run 1..n over the code cells, in order (a fresh kernel, every cell once);
  * outputs on stderr (warnings with this machine's paths, progress bars) are dropped, and so are the timing
    metadata nbclient could record; a text output holding a memory address ("at 0x7f...") or a path of this
    machine (the checkout, a temporary folder) is an error here, because it would change from run to run or from
    checkout to checkout, and so is a cell whose value is a matplotlib object ("Text(0.5, 1.0, ...)") — end such
    a cell with `;` or print what matters;
  * a notebook whose execution fails is left untouched, and the script exits non-zero.

The budget (tests/test_notebooks_stored.py checks it too): the folder under 8 MB, no notebook over 1.5 MB.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import re
import resource
import sys
import tempfile
import time
from pathlib import Path

NB_DIR = Path(__file__).resolve().parent
REPO = NB_DIR.parent
FOLDER_BUDGET, NOTEBOOK_BUDGET = 8_000_000, 1_500_000   # bytes
ADDRESS = re.compile(r"\bat 0x[0-9a-fA-F]{6,}")          # "<Figure ... at 0x7f3c...>": different on every run
PATHS = (str(REPO), tempfile.gettempdir() + os.sep)       # this checkout's path, a temporary folder: not the reader's
REPR = re.compile(r"^(Text\(|\[<matplotlib|<matplotlib|<Figure)")  # a cell ending in plt.title(...) etc.: end it with ;


def source_sha256(source: str) -> str:
    return hashlib.sha256(source.encode("utf-8")).hexdigest()


def clean(nb) -> list[str]:
    """Strip what changes from run to run, stamp each code cell with its source's hash; -> the problems left."""
    problems = []
    nb.metadata.get("language_info", {}).pop("version", None)   # the exact Python of whoever ran it last
    code = [c for c in nb.cells if c.cell_type == "code"]
    for n, cell in enumerate(code, start=1):
        cell.metadata.pop("execution", None)
        cell.metadata["source_sha256"] = source_sha256(cell.source)
        cell.outputs = [o for o in cell.outputs if not (o.output_type == "stream" and o.name == "stderr")]
        if cell.execution_count != n:
            problems.append(f"code cell {n} has execution count {cell.execution_count}")
        for o in cell.outputs:
            text = o.get("text", "") if o.output_type == "stream" else o.get("data", {}).get("text/plain", "")
            if o.output_type == "error":
                problems.append(f"code cell {n}: {o.ename}: {o.evalue}")
            elif ADDRESS.search("".join(text)):
                problems.append(f"code cell {n} prints a memory address: {ADDRESS.search(''.join(text)).group()} "
                                f"in {''.join(text)[:80]!r}")
            elif any(p in "".join(text) for p in PATHS):
                problems.append(f"code cell {n} prints a path of this machine: {''.join(text)[:120]!r}")
            elif o.output_type == "execute_result" and REPR.match("".join(text)):
                problems.append(f"code cell {n} shows a matplotlib object, {''.join(text)[:60]!r}: end it with ';'")
    return problems


def children_cpu() -> float:
    """CPU seconds of this process's finished children (the kernels, and what they ran) so far."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def execute(path: Path, timeout: int) -> tuple[float, float, list[str]]:
    """Run one notebook in a fresh kernel; write it back only when it ran cleanly.
    -> (wall seconds, CPU seconds of the kernel and its subprocesses, problems)."""
    import nbclient
    import nbformat

    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    client = nbclient.NotebookClient(nb, timeout=timeout, kernel_name="python3", record_timing=False,
                                     resources={"metadata": {"path": str(NB_DIR)}})
    t0, cpu0 = time.perf_counter(), children_cpu()
    try:
        client.execute(env=env)   # the kernel's environment (jupyter_client's start_kernel)
    except nbclient.exceptions.CellExecutionError as e:
        return time.perf_counter() - t0, children_cpu() - cpu0, [str(e)[-3000:]]
    seconds, cpu = time.perf_counter() - t0, children_cpu() - cpu0   # the kernel has exited: its CPU time is counted
    problems = clean(nb)
    if not problems:
        nbformat.write(nb, path)
    return seconds, cpu, problems


def named(path: Path, name: str) -> bool:
    """'07' names 07_unet.ipynb (not 07b_...), as do '07_unet' and '07_unet.ipynb'."""
    return name in (path.name, path.stem) or path.stem.startswith(name + "_")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="notebooks by number (07 is 07_unet, not 07b), name or file name; "
                                                "default: all")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per cell")
    args = parser.parse_args(argv)
    paths = sorted(NB_DIR.glob("*.ipynb"))
    if args.names:
        unknown = [n for n in args.names if not any(named(p, n) for p in paths)]
        if unknown:
            parser.error(f"no notebook is called {' or '.join(unknown)}")
        paths = [p for p in paths if any(named(p, n) for n in args.names)]
    failed, total_wall, total_cpu = [], 0.0, 0.0
    for path in paths:
        seconds, cpu, problems = execute(path, args.timeout)
        total_wall, total_cpu = total_wall + seconds, total_cpu + cpu
        status = "ok" if not problems else "FAILED (left as it was)"
        print(f"{path.name:40s} {seconds:6.1f} s wall {cpu:6.1f} s CPU  {path.stat().st_size / 1e6:5.2f} MB  {status}",
              flush=True)
        for p in problems:
            print("    " + p.replace("\n", "\n    "))
        if problems and not problems[0].startswith("code cell"):   # the execution failed: the traceback was printed
            continue
        if problems:
            failed.append(path.name)
    sizes = {p.name: p.stat().st_size for p in NB_DIR.iterdir() if p.is_file()}
    total = sum(sizes.values())
    over = [f"{n} ({s / 1e6:.2f} MB)" for n, s in sizes.items() if n.endswith(".ipynb") and s > NOTEBOOK_BUDGET]
    print(f"{len(paths)} notebooks: {total_wall:.0f} s wall, {total_cpu:.0f} s CPU (kernels and their subprocesses)")
    print(f"notebooks/: {total / 1e6:.2f} MB in all (budget {FOLDER_BUDGET / 1e6:.0f} MB)"
          + (f"; over {NOTEBOOK_BUDGET / 1e6} MB: {', '.join(over)}" if over else ""))
    if failed:
        print("failed:", ", ".join(failed))
    return 1 if failed or over or total > FOLDER_BUDGET else 0


if __name__ == "__main__":
    sys.exit(main())
