"""The notebooks are committed executed, so the repository page shows their pictures and numbers. These checks read
the stored files (nothing runs): a notebook whose code changed since it was executed fails here until
`make notebooks` (notebooks/execute.py) re-runs it and stores the new outputs. The size budget keeps the folder
light: under 8 MB in all, no notebook over 1.5 MB."""
import glob
import hashlib
import json
import os
import re

import pytest

NB_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "notebooks")
NOTEBOOKS = sorted(glob.glob(os.path.join(NB_DIR, "*.ipynb")))
IDS = [os.path.basename(p) for p in NOTEBOOKS]
RERUN = "run `make notebooks` (or `python notebooks/execute.py {}`) and commit the result"
TRY_THIS = re.compile(r"\s*(#+\s*)?(\*\*)?Try this\b")


def code_cells(path):
    with open(path, encoding="utf-8") as f:
        nb = json.load(f)
    return nb, [c for c in nb["cells"] if c["cell_type"] == "code"]


def source(cell) -> str:
    s = cell["source"]
    return s if isinstance(s, str) else "".join(s)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_stored_outputs_are_current(path):
    """Every code cell was executed from its present source, once, in order, without an error."""
    name = os.path.basename(path)
    _, cells = code_cells(path)
    problems = []
    for n, cell in enumerate(cells, start=1):
        stamp = cell.get("metadata", {}).get("source_sha256")
        if stamp is None:
            problems.append(f"code cell {n} was never executed by notebooks/execute.py (no source_sha256)")
        elif stamp != hashlib.sha256(source(cell).encode("utf-8")).hexdigest():
            problems.append(f"code cell {n} changed since it was executed: {source(cell)[:60]!r}...")
        if cell.get("execution_count") != n:
            problems.append(f"code cell {n} has execution count {cell.get('execution_count')}, expected {n}")
        if "outputs" not in cell:
            problems.append(f"code cell {n} has no outputs list")
        for o in cell.get("outputs", []):
            if o["output_type"] == "error":
                problems.append(f"code cell {n} stored an error: {o['ename']}: {o['evalue']}")
            if o["output_type"] == "stream" and o["name"] == "stderr":
                problems.append(f"code cell {n} stored a stderr stream (volatile: paths, progress bars)")
    assert not problems, f"{name} is stale, {RERUN.format(name[:-6])}:\n" + "\n".join(problems)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_stored_notebook_draws_and_fits(path):
    """It shows at least one picture (stored as PNG) and stays under 1.5 MB."""
    _, cells = code_cells(path)
    pngs = sum("image/png" in o.get("data", {}) for c in cells for o in c.get("outputs", []))
    assert pngs > 0, f"{os.path.basename(path)} stores no figure, {RERUN.format(os.path.basename(path)[:-6])}"
    size = os.path.getsize(path)
    assert size <= 1_500_000, f"{os.path.basename(path)} is {size / 1e6:.2f} MB, over the 1.5 MB budget"


def test_notebook_folder_fits():
    size = sum(os.path.getsize(os.path.join(NB_DIR, f)) for f in os.listdir(NB_DIR)
               if os.path.isfile(os.path.join(NB_DIR, f)))
    assert size <= 8_000_000, f"notebooks/ holds {size / 1e6:.2f} MB, over the 8 MB budget"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_notebook_ends_with_try_this(path):
    """The last section is a markdown cell headed **Try this** followed by a ready code cell (the knob to turn)."""
    nb, _ = code_cells(path)
    cells = nb["cells"]
    heads = [i for i, c in enumerate(cells) if c["cell_type"] == "markdown" and TRY_THIS.match(source(c))]
    assert heads, f"{os.path.basename(path)} has no markdown cell headed 'Try this'"
    first = heads[0]
    assert first + 1 < len(cells) and cells[first + 1]["cell_type"] == "code" and source(cells[first + 1]).strip(), \
        f"{os.path.basename(path)}: the 'Try this' cell is not followed by a code cell"
    later_sections = [source(c).splitlines()[0] for c in cells[first + 1:] if c["cell_type"] == "markdown"
                      and source(c).lstrip().startswith("#") and not TRY_THIS.match(source(c))]
    assert not later_sections, f"{os.path.basename(path)}: 'Try this' is not the last section ({later_sections})"
