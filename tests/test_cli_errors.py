"""Every command answers bad input the way `minidiff generate` does (issue #26): one line on stderr,
`minidiff COMMAND: error: ...`, naming the flag, exit status 2, no traceback — and nothing half-done: a refused
command writes no file and makes no folder.

CASES is the matrix: for each command, each flag with a constraint gets its bad values (negative, zero, NaN, the
wrong type, a missing path, a path that cannot be written, the wrong kind of file). Paths that cannot be written are
paths under a regular FILE (`somefile/out`): the tests may run as root, whom chmod does not stop.

  test_command_refuses        every case through minidiff.cli.main in this process (the exit status, stderr's last
                              line, the flag, no traceback; the place's files before and after are the same)
  test_as_users_run_it        one case per command (and the issue's five) as `python -m minidiff ...` in a subprocess
  test_finetune_config_says_the_same
                              the finetune cases with an API twin: FinetuneConfig(...) (or train(cfg) for what needs
                              the file system or the model) raises the message the command printed
plus API-only wrong types, the tiny recipe's and compare()'s doors, a corrupt image in a dataset (skipped with a
warning naming it; an error when none is left), a run that fails later (its last good checkpoint is named), and a
bug's error, which keeps its traceback. docs/promises.md quotes the counts; test_matrix_counts keeps them honest.
"""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from minidiff import cli
from minidiff.checkpoint import DEFAULT_MODEL
from minidiff.errors import InputTypeError, InputValueError

ROOT = Path(__file__).resolve().parent.parent
MODEL = str(DEFAULT_MODEL)                       # the embedded model (32x32 images, VAE factor 4): loads in a second


# ------------------------------------------------------------------------------------------------ the place
@pytest.fixture(scope="module")
def place(tmp_path_factory):
    """A folder with what the cases point at; every case runs in it (relative paths)."""
    d = tmp_path_factory.mktemp("place")
    data = d / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(data / f"{i}.png")
    (data / "metadata.jsonl").write_text("".join(json.dumps({"file_name": f"{i}.png", "text": f"a red circle {i}"})
                                                 + "\n" for i in range(3)))
    (d / "somefile").write_text("a regular file: nothing can be created under it, not even by root\n")
    (d / "notes.txt").write_text("not a model, not an image\n")
    (d / "empty").mkdir()                                                    # a folder without metadata.jsonl
    (d / "binary.txt").write_bytes(b"\xff\xfe\x00\x81 not text")
    (d / "comments.txt").write_text("# only a comment\n\n")
    (d / "one.txt").write_text("a red circle\n")
    Image.new("RGB", (32, 32)).save(d / "pic.png")
    Image.new("L", (16, 16)).save(d / "mask16.png")
    # an --output whose checkpoint was saved by a LoRA run (state.pt holds the config; no tensors are needed to
    # refuse the resume: it is read before the model loads)
    from minidiff.train import FinetuneConfig
    from minidiff.train.state import config_dict
    ckpt = d / "lora-run" / "checkpoints" / "step-000002"
    ckpt.mkdir(parents=True)
    saved = config_dict(FinetuneConfig(data="data", output="lora-run", train="lora"))
    torch.save({"step": 2, "config": {**saved, "_world": 1}}, ckpt / "state.pt")
    return d


def listing(folder: Path) -> dict:
    """Every file and folder under `folder` with its size and modification time: what a refused command must leave
    as it was."""
    return {str(p.relative_to(folder)): (p.is_dir(), p.stat().st_size if p.is_file() else 0, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*"))}


# ------------------------------------------------------------------------------------------------ the matrix
def case(argv, flag, match, api=None, api_error=ValueError, id=None):
    """argv: the command line; flag: what the error line must name; match: a regex the message must contain;
    api: the FinetuneConfig twin (FinetuneConfig(data="data", output="out", **api)), "train" in it = through
    train(cfg) (the file system or the model is needed to refuse it)."""
    return pytest.param(argv, flag, match, api, api_error, id=id or " ".join(argv[1:])[:70])


FT = ["finetune", "--data", "data", "--output", "out"]                       # the embedded model
GEN = ["generate", "a red circle", "--out", "o.png", "--steps", "2"]
CMP = ["compare", "--tuned", MODEL, "--out", "g.png", "--prompts", "one.txt", "--seeds", "0", "--steps", "1"]
TINY = ["train-tiny", "--out", "tiny", "--quick"]
DATA = ["data", "pokemon", "poke", "--no-progress"]
EVAL = ["shapes-eval"]
NOT_A_MODEL = r"notes.txt: unknown weights file type '.txt'"

CASES = [
    # -------------------------------------------------------------------------------------------- finetune
    case(FT + ["--data", "nothere"], "--data",
         r"data must be a folder holding metadata.jsonl, got 'nothere': no such file or folder \(--data\)",
         api=dict(data="nothere", train_=True)),
    case(FT + ["--data", "somefile"], "--data", r"got 'somefile': a file, not a folder \(--data\)",
         api=dict(data="somefile", train_=True)),
    case(FT + ["--data", "empty"], "--data", r"got 'empty': no metadata.jsonl in it \(--data\)",
         api=dict(data="empty", train_=True)),
    case(FT + ["--output", "somefile/out"], "--output",
         r"output must be a folder that can be created or written, got 'somefile/out': 'somefile' is a file, not a "
         r"folder \(--output\)", api=dict(output="somefile/out", train_=True)),
    case(FT + ["--output", "somefile"], "--output", r"got 'somefile': a file, not a folder \(--output\)",
         api=dict(output="somefile", train_=True)),
    case(FT + ["--output", "lora-run"], "--resume", r"--output lora-run already holds checkpoints of a run "
         r"\(latest: step-000002\): pass --resume to continue it, or use another --output",
         api=dict(output="lora-run", train_=True), api_error=FileExistsError),
    case(FT + ["--output", "lora-run", "--resume"], "--train",
         r"--resume: lora-run/checkpoints/step-000002 was saved with train='lora', this run has train='unet' "
         r"\(--train\): resume with the same --train", api=dict(output="lora-run", resume=True, train_=True)),
    case(FT + ["--model", "/nonexistent"], "--model", r"got '/nonexistent': no such file or folder \(--model\)",
         api=dict(model="/nonexistent", train_=True)),
    case(FT + ["--model", "notes.txt"], "--model", NOT_A_MODEL, api=dict(model="notes.txt", train_=True)),
    case(FT + ["--steps", "-3"], "--steps", r"steps must be an int >= 0, got -3 \(--steps\)", api=dict(steps=-3)),
    case(FT + ["--steps", "1.5"], "--steps", r"argument --steps: invalid int value: '1.5'"),
    case(FT + ["--batch-size", "0"], "--batch-size", r"batch_size must be an int >= 1, got 0 \(--batch-size\)",
         api=dict(batch_size=0)),
    case(FT + ["--grad-accum", "0"], "--grad-accum", r"grad_accum must be an int >= 1, got 0 \(--grad-accum\)",
         api=dict(grad_accum=0)),
    case(FT + ["--lr", "-1"], "--lr", r"lr must be a finite number > 0, got -1.0 \(--lr\)", api=dict(lr=-1.0)),
    case(FT + ["--lr", "0"], "--lr", r"lr must be a finite number > 0, got 0.0 \(--lr\)", api=dict(lr=0.0)),
    case(FT + ["--lr", "nan"], "--lr", r"lr must be a finite number > 0, got nan \(--lr\)", api=dict(lr=float("nan"))),
    case(FT + ["--lr", "fast"], "--lr", r"argument --lr: invalid float value: 'fast'"),
    case(FT + ["--resolution", "30"], "--resolution",
         r"--resolution must be a multiple of 4 for this model's VAE, got 30", api=dict(resolution=30, train_=True)),
    case(FT + ["--resolution", "0"], "--resolution", r"resolution must be an int >= 1 or None, got 0 \(--resolution\)",
         api=dict(resolution=0)),
    case(FT + ["--seed", "-1"], "--seed", r"seed must be an int in \[0, 18446744073709551615\], got -1 \(--seed\)",
         api=dict(seed=-1)),
    case(FT + ["--train", "everything"], "--train", r"argument --train: invalid choice: 'everything'"),
    case(FT + ["--train", "last-up-blocks", "--up-blocks", "0"], "--up-blocks",
         r"up_blocks must be an int >= 1, got 0 \(--up-blocks\)", api=dict(train="last-up-blocks", up_blocks=0)),
    case(FT + ["--train", "last-up-blocks", "--up-blocks", "99"], "--up-blocks",
         r"--up-blocks must be in 1\.\.3 \(this U-Net has 3 up-blocks\), got 99",
         api=dict(train="last-up-blocks", up_blocks=99, train_=True)),
    case(FT + ["--train", "lora", "--lora-rank", "0"], "--lora-rank",
         r"lora_rank must be an int >= 1, got 0 \(--lora-rank\)", api=dict(train="lora", lora_rank=0)),
    case(FT + ["--train", "lora", "--lora-alpha", "-1"], "--lora-alpha",
         r"lora_alpha must be a finite number > 0 or None, got -1.0 \(--lora-alpha\)",
         api=dict(train="lora", lora_alpha=-1.0)),
    case(FT + ["--train", "lora", "--lora-preset", "everything"], "--lora-preset",
         r"argument --lora-preset: invalid choice: 'everything'", api=None),
    case(FT + ["--train", "lora", "--lora-conv-rank", "0"], "--lora-conv-rank",
         r"lora_conv_rank must be an int >= 1 or None, got 0 \(--lora-conv-rank\)",
         api=dict(train="lora", lora_conv_rank=0)),
    case(FT + ["--train", "lora", "--lora-preset", "attn-only", "--lora-conv-alpha", "4"], "--lora-conv-alpha",
         r"lora_conv_alpha \(--lora-conv-alpha\) sets the LoRA of the k×k convolutions: it needs lora_preset='full' "
         r"\(--lora-preset full\); preset 'attn-only' puts no LoRA on a k×k convolution",
         api=dict(train="lora", lora_preset="attn-only", lora_conv_alpha=4.0)),
    case(FT + ["--lora-text-encoder"], "--lora-text-encoder",
         r"lora_text_encoder \(--lora-text-encoder\) needs train='lora' \(--train lora\), got train='unet'",
         api=dict(lora_text_encoder=True)),
    case(FT + ["--train", "textual-inversion"], "--placeholder-token",
         r"--train textual-inversion needs --placeholder-token \(the new word, e.g. '<pika>'\) and "
         r"--initializer-token", api=dict(train="textual-inversion")),
    case(FT + ["--placeholder-token", "<x>"], "--placeholder-token",
         r"placeholder_token \(--placeholder-token\) is for --train textual-inversion; this run has train='unet'",
         api=dict(placeholder_token="<x>")),
    case(FT + ["--train", "textual-inversion", "--placeholder-token", "<x>", "--initializer-token", "a picture"],
         "--initializer-token", r"--initializer-token must be one token of the vocabulary; 'a picture' is 2 tokens",
         api=dict(train="textual-inversion", placeholder_token="<x>", initializer_token="a picture", train_=True)),
    case(FT + ["--train", "textual-inversion", "--placeholder-token", "<x>", "--initializer-token", "red",
               "--num-vectors", "0"], "--num-vectors", r"num_vectors must be an int >= 1, got 0 \(--num-vectors\)",
         api=dict(train="textual-inversion", placeholder_token="<x>", initializer_token="red", num_vectors=0)),
    case(FT + ["--min-snr-gamma", "nan"], "--min-snr-gamma",
         r"min_snr_gamma must be a finite number > 0 or None, got nan \(--min-snr-gamma\)",
         api=dict(min_snr_gamma=float("nan"))),
    case(FT + ["--noise-offset", "-0.1"], "--noise-offset",
         r"noise_offset must be a finite number >= 0, got -0.1 \(--noise-offset\)", api=dict(noise_offset=-0.1)),
    case(FT + ["--caption-dropout", "1.5"], "--caption-dropout",
         r"caption_dropout must be a finite number in \[0, 1\], got 1.5 \(--caption-dropout\)",
         api=dict(caption_dropout=1.5)),
    case(FT + ["--weight-decay", "-1"], "--weight-decay",
         r"weight_decay must be a finite number >= 0, got -1.0 \(--weight-decay\)", api=dict(weight_decay=-1.0)),
    case(FT + ["--adam-beta1", "1"], "--adam-beta1",
         r"adam_beta1 must be a finite number in \[0, 1\), got 1.0 \(--adam-beta1\)", api=dict(adam_beta1=1.0)),
    case(FT + ["--adam-beta2", "-0.5"], "--adam-beta2",
         r"adam_beta2 must be a finite number in \[0, 1\), got -0.5 \(--adam-beta2\)", api=dict(adam_beta2=-0.5)),
    case(FT + ["--adam-eps", "0"], "--adam-eps", r"adam_eps must be a finite number > 0, got 0.0 \(--adam-eps\)",
         api=dict(adam_eps=0.0)),
    case(FT + ["--warmup-steps", "-1"], "--warmup-steps",
         r"warmup_steps must be an int >= 0, got -1 \(--warmup-steps\)", api=dict(warmup_steps=-1)),
    case(FT + ["--max-grad-norm", "-1"], "--max-grad-norm",
         r"max_grad_norm must be a finite number >= 0 or None, got -1.0 \(--max-grad-norm\)",
         api=dict(max_grad_norm=-1.0)),
    case(FT + ["--ema-decay", "2"], "--ema-decay", r"ema_decay must be a finite number in \[0, 1\], got 2.0",
         api=dict(ema_decay=2.0)),
    case(FT + ["--num-workers", "-1"], "--num-workers", r"num_workers must be an int >= 0, got -1",
         api=dict(num_workers=-1)),
    case(FT + ["--cache-latents", "--random-crop"], "--cache-latents",
         r"cache_latents \(--cache-latents\) needs center_crop \(--center-crop\)",
         api=dict(cache_latents=True, center_crop=False)),
    case(FT + ["--checkpoint-every", "0"], "--checkpoint-every",
         r"checkpoint_every must be an int >= 1, got 0 \(--checkpoint-every\)", api=dict(checkpoint_every=0)),
    case(FT + ["--keep-last", "0"], "--keep-last", r"keep_last must be an int >= 1, got 0 \(--keep-last\)",
         api=dict(keep_last=0)),
    case(FT + ["--validation-prompts", "nothere.txt"], "--validation-prompts",
         r"validation_prompts must be a text file, one prompt per line, got 'nothere.txt': no such file or folder"),
    case(FT + ["--validation-prompts", "binary.txt"], "--validation-prompts",
         r"--validation-prompts binary.txt: not UTF-8 text"),
    case(FT + ["--validation-prompts", "comments.txt"], "--validation-prompts",
         r"--validation-prompts comments.txt: no prompts \(one per line\)"),
    case(FT + ["--validation-seeds", "0,-1"], "--validation-seeds",
         r"argument --validation-seeds: must be comma-separated seeds, ints in \[0, 18446744073709551615\], "
         r"got '0,-1'"),
    case(FT + ["--validation-steps", "-1"], "--validation-steps",
         r"validation_steps must be an int >= 0, got -1", api=dict(validation_steps=-1)),
    case(FT + ["--validation-guidance", "inf"], "--validation-guidance",
         r"validation_guidance must be a finite number >= 0, got inf", api=dict(validation_guidance=float("inf"))),
    case(FT + ["--validation-scheduler", "fastest"], "--validation-scheduler",
         r"argument --validation-scheduler: unknown sampler 'fastest'"),
    case(FT + ["--max-steps-this-run", "-1"], "--max-steps-this-run",
         r"max_steps_this_run must be an int >= 0 or None, got -1", api=dict(max_steps_this_run=-1)),
    case(FT + ["--device", "toaster"], "--device",
         r"device must be a torch device this machine has \(cpu, cuda, cuda:N, mps\), got 'toaster': not a device "
         r"name \(--device\)", api=dict(device="toaster", train_=True)),
    case(FT + ["--device", "cuda:99"], "--device", r"got 'cuda:99': this machine has",
         api=dict(device="cuda:99", train_=True)),
    # -------------------------------------------------------------------------------------------- generate
    case(GEN + ["--steps", "0"], "--steps", r"steps must be an int in \[1, 999\], got 0 \(--steps\)"),
    case(GEN + ["--guidance", "nan"], "--guidance", r"guidance_scale must be a finite number >= 0, got nan"),
    case(GEN + ["--seed", "-5"], "--seed", r"seed must be an int in \[0, 18446744073709551615\], got -5"),
    case(GEN + ["--num-images", "0"], "--num-images", r"num_images must be an int >= 1, got 0"),
    case(GEN + ["--width", "33"], "--width", r"width must be a positive multiple of 4 \(pixels\), got 33"),
    case(GEN + ["--height", "-8"], "--height", r"height must be a positive multiple of 4 \(pixels\), got -8"),
    case(GEN + ["--image", "pic.png", "--strength", "1.5"], "--strength",
         r"strength must be a finite number in \[0, 1\], got 1.5"),
    case(GEN + ["--image", "nothere.png"], "--image", r"got 'nothere.png': no such file or folder \(--image\)"),
    case(GEN + ["--image", "notes.txt"], "--image", r"--image notes.txt: cannot read it as an image"),
    case(GEN + ["--mask", "pic.png"], "--mask", r"--mask needs --image \(the picture to inpaint\)"),
    case(GEN + ["--image", "pic.png", "--mask", "mask16.png"], "--mask",
         r"mask_image is 16x16 pixels but image is 32x32: they must have the same size"),
    case(GEN + ["--upscale", "-1"], "--upscale", r"upscale must be an int >= 0, got -1 \(--upscale\)"),
    case(GEN + ["--model", "/nonexistent"], "--model", r"got '/nonexistent': no such file or folder \(--model\)"),
    case(GEN + ["--model", "notes.txt"], "--model", NOT_A_MODEL),
    case(GEN + ["--out", "somefile/o.png"], "--out", r"'somefile' is a file, not a folder \(--out\)"),
    case(GEN + ["--out", "empty"], "--out", r"got 'empty': a folder, not a file \(--out\)"),
    case(GEN + ["--attention-maps", "somefile/m.png"], "--attention-maps",
         r"'somefile' is a file, not a folder \(--attention-maps\)"),
    case(GEN + ["--attention-maps", "m.png", "--num-images", "2"], "--attention-maps",
         r"--attention-maps maps one image: leave --num-images at 1"),
    case(GEN + ["--device", "toaster"], "--device", r"got 'toaster': not a device name \(--device\)"),
    case(GEN + ["--scheduler", "fastest"], "--scheduler", r"argument --scheduler: unknown sampler 'fastest'"),
    # -------------------------------------------------------------------------------------------- compare
    case(CMP + ["--tuned", "nothere"], "--tuned", r"got 'nothere': no such file or folder \(--tuned\)"),
    case(CMP + ["--base", "notes.txt"], "--base", NOT_A_MODEL),
    case(CMP + ["--seeds", "a,b"], "--seeds", r"argument --seeds: must be comma-separated seeds"),
    case(CMP + ["--seeds", "-1"], "--seeds", r"argument --seeds: must be comma-separated seeds"),
    case(CMP + ["--steps", "0"], "--steps", r"steps must be an int >= 1, got 0 \(--steps\)"),
    case(CMP + ["--guidance", "-1"], "--guidance", r"guidance must be a finite number >= 0, got -1.0 \(--guidance\)"),
    case(CMP + ["--height", "30"], "--height", r"height must be a positive multiple of 4 \(pixels\), got 30"),
    case(CMP + ["--width", "0"], "--width", r"width must be an int >= 1 or None, got 0 \(--width\)"),
    case(CMP + ["--cell", "0"], "--cell", r"cell must be an int >= 1 or None, got 0 \(--cell\)"),
    case(CMP + ["--labels", "one"], "--labels", r"--labels needs two names separated by a comma, got 'one'"),
    case(CMP + ["--prompts", "nothere.txt"], "--prompts", r"got 'nothere.txt': no such file or folder \(--prompts\)"),
    case(CMP + ["--prompts", "binary.txt"], "--prompts", r"--prompts binary.txt: not UTF-8 text"),
    case(CMP + ["--out", "somefile/g.png"], "--out", r"'somefile' is a file, not a folder \(--out\)"),
    case(CMP + ["--device", "toaster"], "--device", r"got 'toaster': not a device name \(--device\)"),
    # -------------------------------------------------------------------------------------------- train-tiny
    case(TINY + ["--out", "somefile/tiny"], "--out", r"'somefile' is a file, not a folder \(--out\)"),
    case(TINY + ["--out", "somefile"], "--out", r"got 'somefile': a file, not a folder \(--out\)"),
    case(TINY + ["--work", "somefile/w"], "--work", r"'somefile' is a file, not a folder \(--work\)"),
    case(TINY + ["--data", "somefile/d"], "--data", r"'somefile' is a file, not a folder \(--data\)"),
    case(TINY + ["--threads", "0"], "--threads", r"threads must be an int >= 1, got 0 \(--threads\)"),
    case(TINY + ["--stop-after", "never"], "--stop-after", r"argument --stop-after: invalid choice: 'never'"),
    # -------------------------------------------------------------------------------------------- data
    case(["data", "pokemon", "somefile/poke"], "DIR", r"'somefile' is a file, not a folder \(DIR\)"),
    case(DATA + ["--limit", "0"], "--limit", r"limit must be an int >= 1 or None, got 0 \(--limit\)"),
    case(DATA + ["--size", "-512"], "--size", r"size must be an int >= 1, got -512 \(--size\)"),
    case(DATA + ["--cache", "somefile/c"], "--cache", r"'somefile' is a file, not a folder \(--cache\)"),
    case(["data", "digimon", "poke"], "dataset", r"argument dataset: invalid choice: 'digimon'"),
    # -------------------------------------------------------------------------------------------- annotate
    case(["annotate", "nothere", "--no-browser"], "DIR", r"got 'nothere': no such file or folder \(DIR\)"),
    case(["annotate", "empty", "--no-browser"], "DIR", r"got 'empty': no metadata.jsonl in it \(DIR\)"),
    case(["annotate", "somefile", "--no-browser"], "DIR", r"got 'somefile': a file, not a folder \(DIR\)"),
    case(["annotate", "data", "--no-browser", "--port", "70000"], "--port",
         r"port must be an int in \[0, 65535\], got 70000 \(--port\)"),
    # -------------------------------------------------------------------------------------------- shapes-eval
    case(EVAL + ["--seeds", "0"], "--seeds", r"seeds must be an int >= 1, got 0 \(--seeds\)"),
    case(EVAL + ["--steps", "-1"], "--steps", r"steps must be an int >= 1, got -1 \(--steps\)"),
    case(EVAL + ["--guidance", "nan"], "--guidance", r"guidance must be a finite number >= 0, got nan \(--guidance\)"),
    case(EVAL + ["--threads", "0"], "--threads", r"threads must be an int >= 1, got 0 \(--threads\)"),
    case(EVAL + ["--grid", "somefile/g.png"], "--grid", r"'somefile' is a file, not a folder \(--grid\)"),
    case(EVAL + ["--json", "empty"], "--json", r"got 'empty': a folder, not a file \(--json\)"),
    case(EVAL + ["--model", "nothere"], "--model", r"got 'nothere': no such file or folder \(--model\)"),
    case(EVAL + ["--model", "notes.txt"], "--model", NOT_A_MODEL),
    # -------------------------------------------------------------------------------------------- serve
    case(["serve", "--port", "-1"], "--port", r"port must be an int in \[0, 65535\], got -1 \(--port\)"),
    case(["serve", "--model", "nothere"], "--model", r"got 'nothere': no such file or folder \(--model\)"),
    case(["serve", "--model", "notes.txt"], "--model", NOT_A_MODEL),
    case(["serve", "--embedding", "nothere.pt"], "--embedding", r"got 'nothere.pt': no such file or folder"),
    case(["serve", "--device", "toaster"], "--device", r"got 'toaster': not a device name \(--device\)"),
    case(["serve", "--api-auth", "nocolon"], "--api-auth",
         r"--api-auth wants USER:PASS \(several separated by commas\), got 'nocolon'"),
]


def run_in_process(argv, capsys):
    try:
        code = cli.main(argv)
    except SystemExit as e:                      # argparse's usage errors exit on their own
        code = e.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def blocking_entry_points_fail(monkeypatch):
    """serve and annotate would wait for Ctrl+C if a bad case got past the door: make that a failure instead."""
    import uvicorn

    from minidiff.commands import annotate

    def past_the_door(*a, **k):
        raise AssertionError("the command was not refused")
    monkeypatch.setattr(uvicorn.Server, "run", past_the_door)
    monkeypatch.setattr(annotate, "serve", past_the_door)


@pytest.mark.parametrize("argv,flag,match,api,api_error", CASES)
def test_command_refuses(place, monkeypatch, capsys, blocking_entry_points_fail, argv, flag, match, api, api_error):
    monkeypatch.chdir(place)
    before = listing(place)
    code, out, err = run_in_process(argv, capsys)
    lines = err.strip().splitlines()
    assert code == 2, err
    assert lines and lines[-1].startswith(f"minidiff {argv[0]}: error: "), err
    assert flag in lines[-1], lines[-1]
    assert re.search(match, lines[-1]), lines[-1]
    assert "Traceback" not in err + out
    assert listing(place) == before                                     # nothing written, no folder made


@pytest.mark.parametrize("argv,flag,match,api,api_error", [c for c in CASES if c.values[3] is not None])
def test_finetune_config_says_the_same(place, monkeypatch, capsys, argv, flag, match, api, api_error):
    """The same values through the API: FinetuneConfig(...) — or train(cfg), for what needs the file system or the
    model — raises the message the command printed (which may add the flag at the end)."""
    from minidiff.train import FinetuneConfig, train
    monkeypatch.chdir(place)
    code, _, err = run_in_process(argv, capsys)
    line = err.strip().splitlines()[-1].removeprefix("minidiff finetune: error: ")
    kw = {k: v for k, v in api.items() if k != "train_"}
    with pytest.raises(api_error) as info:
        cfg = FinetuneConfig(**{"data": "data", "output": "out", **kw})
        assert api.get("train_"), "FinetuneConfig accepted it, but the table says it refuses it"
        train(cfg)
    assert line.startswith(str(info.value)), (line, str(info.value))
    assert not (place / "out").exists()


# ------------------------------------------------------------------------------------------------ as users run it
def env():
    return {**os.environ, "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


AS_USERS_RUN_IT = [   # one case per command, and the five of the issue
    FT + ["--data", "nothere"], FT + ["--steps", "-3"], FT + ["--lr", "-1"], FT + ["--model", "/nonexistent"],
    ["compare", "--tuned", MODEL, "--seeds", "a,b", "--out", "g.png"],
    GEN + ["--guidance", "nan"], TINY + ["--out", "somefile/tiny"], ["data", "pokemon", "somefile/poke"],
    ["annotate", "empty"], EVAL + ["--seeds", "0"], ["serve", "--port", "70000"],
]


@pytest.mark.parametrize("argv", AS_USERS_RUN_IT, ids=[" ".join(a[:1] + a[-2:]) for a in AS_USERS_RUN_IT])
def test_as_users_run_it(place, argv):
    before = listing(place)
    r = subprocess.run([sys.executable, "-m", "minidiff", *argv], cwd=place, env=env(), capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith(f"minidiff {argv[0]}: error: ")
    assert "Traceback" not in r.stderr + r.stdout
    assert listing(place) == before


# ------------------------------------------------------------------------------------------------ the API's doors
def test_every_setting_has_its_row():
    """A field added to FinetuneConfig, Recipe or compare() without a row of its table would go unchecked: the tables
    cover them all, and every row names a flag that `minidiff finetune` has."""
    import dataclasses
    import inspect

    from minidiff.commands import finetune as command
    from minidiff.compare import COMPARE_FIELDS, compare
    from minidiff.recipes.tiny import RECIPE_FIELDS, Recipe
    from minidiff.settings import flag_of
    from minidiff.train.config import FINETUNE_FIELDS, FinetuneConfig
    assert [f.name for f in dataclasses.fields(FinetuneConfig)] == list(FINETUNE_FIELDS)
    assert [f.name for f in dataclasses.fields(Recipe)] == list(RECIPE_FIELDS)
    assert set(COMPARE_FIELDS) <= set(inspect.signature(compare).parameters)
    parser = __import__("argparse").ArgumentParser()
    command.add_arguments(parser)
    flags = {s for a in parser._actions for s in a.option_strings}
    for field, spec in FINETUNE_FIELDS.items():
        assert all(f.strip() in flags for f in flag_of(field, spec).split("/")), field


API_ONLY = [   # wrong types: the command line cannot pass them (argparse converts), Python can
    (dict(steps="10"), TypeError, r"steps must be an int >= 0, got '10' \(--steps\)"),
    (dict(steps=10.0), TypeError, r"steps must be an int >= 0, got 10.0 \(--steps\)"),
    (dict(lr="1e-5"), TypeError, r"lr must be a finite number > 0, got '1e-5' \(--lr\)"),
    (dict(batch_size=True), TypeError, r"batch_size must be an int >= 1, got True \(bool\) \(--batch-size\)"),
    (dict(center_crop=1), TypeError, r"center_crop must be True or False, got 1 \(--center-crop / --random-crop\)"),
    (dict(train=None), TypeError, r"train must be one of 'unet', 'last-up-blocks', 'lora', 'textual-inversion', "
                                  r"'lcm-lora', got None \(--train\)"),
    (dict(data=3), TypeError, r"data must be a folder holding metadata.jsonl, got 3 \(--data\)"),
    (dict(validation_seeds=(0, "1")), TypeError, r"validation_seeds must be a non-empty list of ints in \[0, "),
    (dict(validation_seeds=()), ValueError, r"validation_seeds must be a non-empty list of ints"),
    (dict(validation_prompts="a cat"), TypeError, r"validation_prompts must be a list of str or None, got 'a cat'"),
    (dict(validation_scheduler="fastest"), ValueError, r"validation_scheduler must be a sampler name such as"),
    (dict(report_to="wandb"), ValueError, r"report_to must be one of 'none', 'tensorboard', got 'wandb'"),
]


@pytest.mark.parametrize("kw,exc,match", API_ONLY, ids=[str(k) for k, _, _ in API_ONLY])
def test_finetune_config_refuses_wrong_types(kw, exc, match):
    from minidiff.train import FinetuneConfig
    with pytest.raises(exc, match=match) as info:
        FinetuneConfig(**{"data": "data", "output": "out", **kw})
    assert type(info.value) is {TypeError: InputTypeError, ValueError: InputValueError}[exc]


RECIPE_CASES = [
    (dict(vae_lr=-1.0), ValueError, r"^vae_lr must be a finite number > 0, got -1.0$"),
    (dict(unet_steps="20"), TypeError, r"^unet_steps must be an int >= 1, got '20'$"),
    (dict(caption_dropout=float("nan")), ValueError, r"^caption_dropout must be a finite number in \[0, 1\], got nan$"),
    (dict(ema_decay=1.0), ValueError, r"^ema_decay must be a finite number in \[0, 1\), got 1.0$"),
    (dict(text_heads=3), ValueError, r"^text_width 64 does not split into text_heads=3 heads$"),
    (dict(unet_groups=5), ValueError, r"^the recipe's networks cannot be built: block_out_channels \[32, 64, 96\] "
                                      r"do not split into norm_num_groups=5 groups"),
]


@pytest.mark.parametrize("kw,exc,match", RECIPE_CASES, ids=[str(k) for k, _, _ in RECIPE_CASES])
def test_tiny_recipe_refuses(kw, exc, match):
    from minidiff.recipes.tiny import Recipe
    with pytest.raises(exc, match=match):
        Recipe(**kw)


def test_tiny_train_refuses_before_making_a_folder(place, monkeypatch):
    from minidiff.recipes.tiny import Recipe, train
    monkeypatch.chdir(place)
    before = listing(place)
    with pytest.raises(ValueError, match=r"out must be a folder that can be created or written, got 'somefile/m'"):
        train("somefile/m", Recipe.quick())
    with pytest.raises(ValueError, match=r"stop_after must be one of .*, got 'never'"):
        train("tiny", Recipe.quick(), stop_after="never")
    assert listing(place) == before


COMPARE_CASES = [
    (dict(seeds=[-1]), ValueError, r"^seeds must be a non-empty list of ints in \[0, 18446744073709551615\], got "
                                   r"\[-1\] \(list\) \(--seeds\)$"),
    (dict(seeds=[]), ValueError, r"seeds must be a non-empty list of ints"),
    (dict(steps=0), ValueError, r"^steps must be an int >= 1, got 0 \(--steps\)$"),
    (dict(guidance=float("nan")), ValueError, r"^guidance must be a finite number >= 0, got nan \(--guidance\)$"),
    (dict(labels=("a",)), ValueError, r"^labels must be a list of 2 str, got \('a',\) \(tuple\) \(--labels\)$"),
    (dict(prompts="a cat"), TypeError, r"^prompts must be a non-empty list of str or None, got 'a cat'"),
    (dict(tuned="nothere"), ValueError, r"tuned must be a diffusers folder .*, got 'nothere': no such file or folder"),
]


@pytest.mark.parametrize("kw,exc,match", COMPARE_CASES, ids=[str(k) for k, _, _ in COMPARE_CASES])
def test_compare_refuses_before_loading(kw, exc, match, monkeypatch):
    from minidiff import compare as compare_module

    def no_loading(*a, **k):
        raise AssertionError("a model was loaded before the settings were checked")
    monkeypatch.setattr(compare_module, "render", no_loading)
    with pytest.raises(exc, match=match):
        compare_module.compare(None, kw.pop("tuned", MODEL), **{"prompts": ["a red circle"], **kw})


# ------------------------------------------------------------------------------------------------ data, and later
def _dataset_with_corrupt_images(folder: Path, good: int, bad: int) -> Path:
    folder.mkdir()
    rows = []
    for i in range(good):
        Image.new("RGB", (32, 32), (200, 30 * i, 0)).save(folder / f"good{i}.png")
        rows.append({"file_name": f"good{i}.png", "text": "a red circle"})
    for i in range(bad):
        (folder / f"bad{i}.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
        rows.append({"file_name": f"bad{i}.png", "text": "a red circle"})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def test_a_corrupt_image_is_skipped_with_a_warning_naming_it(tmp_path):
    """As users run it (a subprocess: pytest would record the warning instead of printing it): one line naming the
    file, and the run goes on with the others."""
    _dataset_with_corrupt_images(tmp_path / "data", good=2, bad=1)
    r = subprocess.run([sys.executable, "-m", "minidiff", "finetune", "--data", "data", "--output", "out", "--steps",
                        "1", "--validation-steps", "0", "--no-progress"], cwd=tmp_path, env=env(),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert f"minidiff finetune: warning: {Path('data') / 'bad0.png'}: skipped, not a readable image" in r.stderr
    assert "Traceback" not in r.stderr and (tmp_path / "out" / "model_index.json").is_file()


def test_a_dataset_with_no_readable_image_is_refused(tmp_path):
    _dataset_with_corrupt_images(tmp_path / "data", good=0, bad=2)
    r = subprocess.run([sys.executable, "-m", "minidiff", "finetune", "--data", "data", "--output", "out"],
                       cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert lines[-1] == "minidiff finetune: error: data (--data): no usable image in data (the warnings above say why)"
    assert f"minidiff finetune: warning: {Path('data') / 'bad1.png'}: skipped, not a readable image" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "out").exists()


def test_a_run_that_fails_later_names_its_last_good_checkpoint(tmp_path, capsys, monkeypatch):
    """A full disk at step 3 (checkpoints every 2 steps): the run stops, step 2's checkpoint stays, stderr says where
    it is, and the error itself is the last line (the system's: the user's to fix, not a traceback)."""
    import errno

    from minidiff.train import objective
    from minidiff.train.state import list_checkpoints
    real, calls = objective.diffusion_loss, {"n": 0}

    def disk_fills_up(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*a, **k)
    monkeypatch.setattr(objective, "diffusion_loss", disk_fills_up)
    _dataset_with_corrupt_images(tmp_path / "data", good=2, bad=0)
    monkeypatch.chdir(tmp_path)
    code, _, err = run_in_process(["finetune", "--data", "data", "--output", "out", "--steps", "6",
                                   "--checkpoint-every", "2", "--validation-steps", "0", "--no-progress"], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert f"the last good checkpoint is {Path('out') / 'checkpoints' / 'step-000002'}" in lines[-2]
    assert lines[-1] == "minidiff finetune: error: No space left on device"
    assert [p.name for p in list_checkpoints(tmp_path / "out")] == ["step-000002"]


def test_a_bug_keeps_its_traceback(monkeypatch):
    """Only minidiff's own errors become one line: a ValueError from somewhere else (torch, numpy, a bug of ours)
    propagates, traceback and all, so it can be reported."""
    from minidiff.commands import shapes_eval

    def buggy(args):
        torch.zeros(2) @ torch.zeros(3)                 # torch's RuntimeError, from inside the command
    monkeypatch.setattr(shapes_eval, "run", buggy)
    with pytest.raises(RuntimeError, match="size mismatch|shapes cannot be multiplied|inconsistent"):
        cli.main(["shapes-eval"])

    def also_buggy(args):
        int("not a number")                              # a plain ValueError
    monkeypatch.setattr(shapes_eval, "run", also_buggy)
    with pytest.raises(ValueError, match="invalid literal"):
        cli.main(["shapes-eval"])


# ------------------------------------------------------------------------------------------------ the counts
def test_matrix_counts():
    """docs/promises.md states these counts; change both together."""
    api_twins = sum(1 for c in CASES if c.values[3] is not None)
    commands = {c.values[0][0] for c in CASES}
    assert commands == set(cli.SUBCOMMANDS)                 # every command has its cases
    assert (len(CASES), api_twins, len(AS_USERS_RUN_IT), len(API_ONLY), len(RECIPE_CASES), len(COMPARE_CASES)) == \
        (120, 48, 11, 12, 6, 7)
