"""`minidiff generate` with --image / --strength / --mask on the embedded model: the file it writes is the picture
pipe.generate returns for the same arguments."""
import numpy as np
import pytest
from PIL import Image

import minidiff
from minidiff.cli import main
from minidiff.commands import generate as cmd
from minidiff.schedulers import SCHEDULER_NAMES


def test_scheduler_choices_are_the_library_names():
    assert list(cmd.SCHEDULERS) == SCHEDULER_NAMES


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


def test_cli_mask_needs_image(tmp_path, pictures):
    with pytest.raises(SystemExit, match="--mask needs --image"):
        main(["generate", "x", "--mask", str(pictures / "mask.png"), "--out", str(tmp_path / "o.png")])


def test_cli_unreadable_image(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_text("not a picture")
    with pytest.raises(SystemExit, match="--image .*bad.png: cannot read it as an image"):
        main(["generate", "x", "--image", str(bad), "--out", str(tmp_path / "o.png")])
