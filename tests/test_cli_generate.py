"""`minidiff generate` with --image / --strength / --mask on the embedded model: the file it writes is the picture
pipe.generate returns for the same arguments."""
import numpy as np
import pytest
from PIL import Image

import minidiff
from minidiff import commands
from minidiff.cli import main
from minidiff.schedulers import SCHEDULER_NAMES


def test_scheduler_choices_are_the_library_names():
    assert list(commands.SCHEDULERS) == SCHEDULER_NAMES


def test_cli_takes_a1111_sampler_names(tmp_path):
    """--scheduler "DPM++ 2M Karras" (any case) draws what scheduler="dpmpp_karras" draws; an unknown name is a
    usage error listing the names, before any model is loaded."""
    out = tmp_path / "out.png"
    assert main(["generate", "a red circle", "--steps", "3", "--seed", "0", "--scheduler", "dpm++ 2m KARRAS",
                 "--upscale", "1", "--out", str(out)]) == 0
    expected = minidiff.load().generate("a red circle", steps=3, seed=0, scheduler="dpmpp_karras", progress=False)[0]
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(expected))


def test_cli_unknown_sampler_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        main(["generate", "x", "--scheduler", "DPM fast"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "argument --scheduler: unknown sampler 'DPM fast'; choose one of ddim, ddpm, dpm2," in err
    assert "or an AUTOMATIC1111 name: Euler a, Euler, LMS, Heun" in err


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    d = tmp_path_factory.mktemp("pics")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (32, 40, 3), dtype=np.uint8)).save(d / "in.png")
    mask = np.zeros((32, 40), dtype=np.uint8)
    mask[8:24, 10:30] = 255
    Image.fromarray(mask).save(d / "mask.png")
    return d


@pytest.mark.parametrize("mask", [False, True], ids=["img2img", "inpaint"])
def test_cli_image_arguments(pictures, tmp_path, mask):
    out = tmp_path / "out.png"
    argv = ["generate", "a red circle", "--image", str(pictures / "in.png"), "--strength", "0.6", "--steps", "5",
            "--seed", "0", "--scheduler", "EULER_A", "--upscale", "1", "--out", str(out)]
    if mask:
        argv += ["--mask", str(pictures / "mask.png")]
    assert main(argv) == 0
    written = Image.open(out)
    assert written.size == (40, 32)  # the input's size, not the model's 32 x 32
    pipe = minidiff.load()
    kw = {"mask_image": Image.open(pictures / "mask.png")} if mask else {}
    expected = pipe.generate("a red circle", image=Image.open(pictures / "in.png"), strength=0.6, steps=5, seed=0,
                             scheduler="euler_a", progress=False, **kw)[0]
    assert np.array_equal(np.asarray(written), np.asarray(expected))


def test_cli_mask_needs_image(tmp_path, pictures, capsys):
    assert main(["generate", "x", "--mask", str(pictures / "mask.png"), "--out", str(tmp_path / "o.png")]) == 2
    assert capsys.readouterr().err == "minidiff generate: error: --mask needs --image (the picture to inpaint)\n"


def test_cli_unreadable_image(tmp_path, capsys):
    bad = tmp_path / "bad.png"
    bad.write_text("not a picture")
    assert main(["generate", "x", "--image", str(bad), "--out", str(tmp_path / "o.png")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"minidiff generate: error: --image {bad}: cannot read it as an image")
    assert not (tmp_path / "o.png").exists()
