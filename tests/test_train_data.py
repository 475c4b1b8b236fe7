"""minidiff.train.data: the one seed scheme and the endless sample stream. A sample is a function of its position in
the stream (so a resumed run, or one of several DDP processes, draws what one uninterrupted process draws), and
positions() splits each global batch between processes."""
import torch

from minidiff.data.imagefolder import ImageFolderDataset
from minidiff.train.data import SampleStream, generator, positions


def test_every_place_has_its_own_generator():
    seeds = {generator(s, stage, n).initial_seed() for s in (0, 1) for stage in ("vae", "clip") for n in (0, 1)}
    assert len(seeds) == 8                                   # every (seed, stage, step) draws its own numbers
    assert torch.equal(torch.randn(4, generator=generator(0, "vae", 3)), torch.randn(4, generator=generator(0, "vae", 3)))


def test_a_sample_is_a_function_of_its_position(tiny):
    dataset = ImageFolderDataset(tiny["data"], 16, center_crop=False)     # 6 images, random crops
    kw = dict(seed=0, caption_dropout=0.5, random_flip=True)
    first, second = SampleStream(dataset, 1000, (4, 8, 8), **kw), SampleStream(dataset, 1000, (4, 8, 8), **kw)
    where = [3, 4, 5, 11, 12]                                # the last two in the second epoch
    forward = [first[p] for p in where]
    backward = [second[p] for p in reversed(where)][::-1]    # read in another order, by another stream
    for a, b in zip(forward, backward):
        assert a.keys() == b.keys() == {"pixel_values", "text", "posterior_eps", "noise", "offset", "t", "guidance_u"}
        assert a["text"] == b["text"]
        for key in ("pixel_values", "posterior_eps", "noise", "offset", "t", "guidance_u"):
            assert torch.equal(a[key], b[key]), key
    assert not torch.equal(forward[0]["noise"], forward[1]["noise"])
    other = SampleStream(dataset, 1000, (4, 8, 8), **{**kw, "seed": 1})
    assert not torch.equal(other[3]["noise"], forward[0]["noise"])
    for epoch in (0, 1):                                     # an epoch visits every image once
        assert sorted(first.index(p)[1] for p in range(6 * epoch, 6 * epoch + 6)) == list(range(6))


def test_positions_split_each_global_batch_between_processes():
    one = list(positions(2, 4, batch_size=4, grad_accum=2))            # optimizer steps 2, 3: micro-batches 4..7
    assert one == list(range(16, 32))
    ranks = [list(positions(2, 4, batch_size=2, grad_accum=2, rank=r, world=2)) for r in (0, 1)]
    for k in range(4):                                       # micro-batch k of both processes = one process's k-th
        assert sorted(ranks[0][2 * k:2 * k + 2] + ranks[1][2 * k:2 * k + 2]) == one[4 * k:4 * k + 4]
