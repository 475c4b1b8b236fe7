"""Every notebook in notebooks/ runs top to bottom without an error (new notebooks are picked up automatically)."""
import glob
import os

import pytest

NB_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "notebooks")
NOTEBOOKS = sorted(glob.glob(os.path.join(NB_DIR, "*.ipynb")))  # collected when pytest imports this file


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[os.path.basename(p) for p in NOTEBOOKS])
def test_notebook_runs(path, monkeypatch):
    # the kernel imports this checkout's minidiff, installed or not (the kernel inherits the environment)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [os.path.dirname(NB_DIR),
                                                                   os.environ.get("PYTHONPATH")])))
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": NB_DIR}})  # cwd = notebooks/
    try:
        client.execute()
    except nbclient.exceptions.CellExecutionError as e:  # the cell's source and the traceback, trimmed
        pytest.fail(f"{os.path.basename(path)} failed:\n{str(e)[-3000:]}", pytrace=False)
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors, [f"{o.ename}: {o.evalue}" for o in errors]
