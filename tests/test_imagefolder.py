"""imagefolder: metadata.jsonl reading (bad lines skipped with a warning), atomic writes, caption updates that touch
one line only, image loading to RGB, and the training Dataset (resize, crop, flip, [-1, 1])."""
import json
import os
import stat
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from minidiff.data.imagefolder import (ImageFolderDataset, ImageLoadError, load_image, read_metadata,
                                       resolve_in_folder, update_caption, write_metadata)


def _png(path, size=(16, 16), color=(10, 20, 30), mode="RGB"):
    Image.new(mode, size, color).save(path)


def _folder(tmp_path, lines):
    for name in ("a.png", "b.png", "c.png"):
        _png(tmp_path / name)
    (tmp_path / "metadata.jsonl").write_text("".join(l + "\n" for l in lines), encoding="utf-8")
    return tmp_path


def test_read_metadata_skips_bad_lines_with_warnings(tmp_path):
    (tmp_path / "sub").mkdir()
    _png(tmp_path / "sub" / "d.png")
    outside = tmp_path.parent / f"{tmp_path.name}_outside.png"
    _png(outside)
    os.symlink(outside, tmp_path / "link.png")
    lines = [
        '{"file_name": "a.png", "text": "an apple", "reviewed": true, "source": "x"}',   # 1 ok, extra keys kept
        "not json at all",                                                                 # 2
        '["a list"]',                                                                      # 3
        '{"file_name": "b.png"}',                                                          # 4 no text
        '{"file_name": "b.png", "text": 3}',                                               # 5 text not a string
        '{"file_name": "../outside.png", "text": "t"}',                                    # 6 escapes
        '{"file_name": "/etc/passwd", "text": "t"}',                                       # 7 absolute
        '{"file_name": "missing.png", "text": "t"}',                                       # 8 not on disk
        '{"file_name": "link.png", "text": "t"}',                                          # 9 symlink out of the folder
        "",                                                                                # blank: ignored silently
        '{"file_name": "sub/d.png", "text": "déjà vu"}',                                   # 11 ok, sub-folder
        '{"file_name": "a.png", "text": "again"}',                                         # 12 duplicate
        '{"file_name": "c.png", "text": ""}',                                              # 13 ok, empty caption
    ]
    _folder(tmp_path, lines)
    with pytest.warns(UserWarning) as record:
        rows = read_metadata(tmp_path)
    assert [r["file_name"] for r in rows] == ["a.png", "sub/d.png", "c.png"]
    assert rows[0] == {"file_name": "a.png", "text": "an apple", "reviewed": True, "source": "x"}
    assert rows[1]["text"] == "déjà vu"
    messages = [str(w.message) for w in record]
    assert len(messages) == 9
    for lineno, msg in zip((2, 3, 4, 5, 6, 7, 8, 9, 12), messages):
        assert f"metadata.jsonl:{lineno}:" in msg, msg
    assert "missing.png" in messages[6] and "outside" in messages[4]


def test_missing_metadata_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="metadata.jsonl"):
        read_metadata(tmp_path)


def test_resolve_in_folder_refuses_escapes(tmp_path):
    assert resolve_in_folder(tmp_path, "x.png") == (tmp_path / "x.png").resolve()
    for bad in ("../x.png", "a/../../x.png", "/etc/passwd", "", "a\x00b", "..\\x.png", None, 3):
        assert resolve_in_folder(tmp_path, bad) is None, bad


def test_write_metadata_round_trip_atomic_and_keeps_permissions(tmp_path):
    _folder(tmp_path, ['{"file_name": "a.png", "text": "old"}'])
    os.chmod(tmp_path / "metadata.jsonl", 0o640)
    rows = [{"file_name": "a.png", "text": "a \"quoted\" caption\nwith a newline", "reviewed": False},
            {"file_name": "b.png", "text": "ünïcode ✓"}]
    write_metadata(tmp_path, rows)
    assert read_metadata(tmp_path) == rows
    text = (tmp_path / "metadata.jsonl").read_text(encoding="utf-8")
    assert len(text.splitlines()) == 2 and text.endswith("\n") and "ünïcode ✓" in text   # one object per line, UTF-8
    assert stat.S_IMODE(os.stat(tmp_path / "metadata.jsonl").st_mode) == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "b.png", "c.png", "metadata.jsonl"]  # no temp left
    with pytest.raises(ValueError):
        write_metadata(tmp_path, [{"file_name": "a.png"}])


def test_failed_write_leaves_the_old_file_intact(tmp_path, monkeypatch):
    _folder(tmp_path, ['{"file_name": "a.png", "text": "old"}'])
    before = (tmp_path / "metadata.jsonl").read_bytes()

    def boom(src, dst):
        raise OSError("disk on fire")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk on fire"):
        write_metadata(tmp_path, [{"file_name": "a.png", "text": "new"}])
    with pytest.raises(OSError, match="disk on fire"):
        update_caption(tmp_path, "a.png", "new")
    assert (tmp_path / "metadata.jsonl").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "b.png", "c.png", "metadata.jsonl"]


def test_update_caption_rewrites_one_line_only(tmp_path):
    lines = ['{"file_name":"a.png","text":"one" ,  "k": 1}',
             "garbage that a person typed",
             '{"file_name": "b.png", "text": "two", "reviewed": false}',
             '{"file_name": "c.png", "text": "three"}']
    _folder(tmp_path, lines)
    row = update_caption(tmp_path, "b.png", "a blue ✓ thing")
    assert row == {"file_name": "b.png", "text": "a blue ✓ thing", "reviewed": True}
    after = (tmp_path / "metadata.jsonl").read_text(encoding="utf-8").splitlines()
    assert after[0] == lines[0] and after[1] == lines[1] and after[3] == lines[3]    # byte for byte
    assert json.loads(after[2]) == row
    update_caption(tmp_path, "c.png", "draft", reviewed=False)
    assert json.loads((tmp_path / "metadata.jsonl").read_text().splitlines()[3])["reviewed"] is False
    with pytest.raises(KeyError):
        update_caption(tmp_path, "zzz.png", "x")
    with pytest.raises(TypeError):
        update_caption(tmp_path, "a.png", 5)


def test_load_image_converts_modes_to_rgb(tmp_path):
    Image.new("L", (4, 4), 128).save(tmp_path / "grey.png")
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 255))
    rgba.putpixel((0, 0), (0, 0, 0, 0))                 # fully transparent black -> white
    rgba.putpixel((1, 0), (0, 0, 0, 128))               # half transparent black -> mid grey
    rgba.save(tmp_path / "rgba.png")
    pal = Image.new("P", (4, 4), 1)
    pal.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    pal.putpixel((0, 0), 0)
    pal.save(tmp_path / "pal.png", transparency=0)      # palette index 0 is transparent
    Image.new("LA", (4, 4), (0, 0)).save(tmp_path / "la.png")
    Image.fromarray(np.full((4, 4), 65535, dtype=np.uint16)).save(tmp_path / "deep.png")

    def px(name, xy=(0, 0)):
        im = load_image(tmp_path / name)
        assert im.mode == "RGB"
        return im.getpixel(xy)

    assert px("grey.png") == (128, 128, 128)
    assert px("rgba.png") == (255, 255, 255) and px("rgba.png", (2, 2)) == (255, 0, 0)
    assert all(abs(c - 127) <= 1 for c in px("rgba.png", (1, 0)))
    assert px("pal.png") == (255, 255, 255) and px("pal.png", (1, 1)) == (0, 255, 0)
    assert px("la.png") == (255, 255, 255)
    assert px("deep.png") == (255, 255, 255)            # 16-bit white stays white, not clipped garbage


def test_load_image_size_and_errors(tmp_path):
    _png(tmp_path / "wide.png", size=(40, 20))
    assert load_image(tmp_path / "wide.png", size=10).size == (20, 10)
    assert load_image(tmp_path / "wide.png", size=(7, 9)).size == (7, 9)
    (tmp_path / "junk.png").write_bytes(b"definitely not a png")
    with pytest.raises(ImageLoadError, match="junk.png"):
        load_image(tmp_path / "junk.png")
    with pytest.raises(ImageLoadError, match="nope.png"):
        load_image(tmp_path / "nope.png")
    with pytest.raises(OSError):                        # ImageLoadError is an OSError
        load_image(tmp_path / "junk.png")


def _gradient(w, h):
    """An RGB image whose pixels all differ, so any crop offset or flip shows."""
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1), (x + y) % 256], -1).astype(np.uint8)


def _to_unit(a):
    return torch.from_numpy(a.astype(np.float32)).permute(2, 0, 1) / 127.5 - 1


def test_dataset_centre_crop_resize_and_range(tmp_path):
    wide, tall = _gradient(24, 16), _gradient(32, 64)
    Image.fromarray(wide).save(tmp_path / "wide.png")
    Image.fromarray(tall).save(tmp_path / "tall.png")
    write_metadata(tmp_path, [{"file_name": "wide.png", "text": "w"}, {"file_name": "tall.png", "text": "t"}])
    ds = ImageFolderDataset(tmp_path, resolution=16)
    assert len(ds) == 2
    item = ds[0]
    assert set(item) == {"pixel_values", "text"} and item["text"] == "w"
    assert item["pixel_values"].shape == (3, 16, 16) and item["pixel_values"].dtype == torch.float32
    # no resize needed (shorter side is 16): the centre crop is columns 4..20
    torch.testing.assert_close(item["pixel_values"], _to_unit(wide[:, 4:20]), rtol=0, atol=1e-6)
    # 32x64 -> 16x32 (bilinear), then rows 8..24
    small = np.asarray(Image.fromarray(tall).resize((16, 32), Image.BILINEAR))
    torch.testing.assert_close(ds[1]["pixel_values"], _to_unit(small[8:24]), rtol=0, atol=1e-6)
    assert ds[-1]["text"] == "t"
    with pytest.raises(IndexError):
        ds[2]


def test_dataset_white_and_black_map_to_plus_minus_one(tmp_path):
    _png(tmp_path / "w.png", color=(255, 255, 255))
    _png(tmp_path / "k.png", color=(0, 0, 0))
    write_metadata(tmp_path, [{"file_name": "w.png", "text": ""}, {"file_name": "k.png", "text": ""}])
    ds = ImageFolderDataset(tmp_path, 8)
    assert torch.all(ds[0]["pixel_values"] == 1) and torch.all(ds[1]["pixel_values"] == -1)


def test_dataset_random_crop_and_flip(tmp_path):
    a = _gradient(24, 16)
    Image.fromarray(a).save(tmp_path / "x.png")
    write_metadata(tmp_path, [{"file_name": "x.png", "text": "x"}])
    crops = {left: _to_unit(a[:, left:left + 16]) for left in range(9)}
    ds = ImageFolderDataset(tmp_path, 16, center_crop=False)
    seen = set()
    for seed in range(20):
        torch.manual_seed(seed)
        x = ds[0]["pixel_values"]
        torch.manual_seed(seed)
        assert torch.equal(ds[0]["pixel_values"], x)                      # the torch seed makes it repeatable
        seen |= {left for left, c in crops.items() if torch.equal(c, x)}
    assert len(seen) >= 4                                                 # real random offsets, all valid crops

    flip = ImageFolderDataset(tmp_path, 16, center_crop=True, random_flip=True)
    centre = crops[4]
    outs = []
    for seed in range(16):
        torch.manual_seed(seed)
        outs.append(flip[0]["pixel_values"])
    n_flipped = sum(torch.equal(o, centre.flip(-1)) for o in outs)
    n_plain = sum(torch.equal(o, centre) for o in outs)
    assert n_flipped + n_plain == 16 and n_flipped > 0 and n_plain > 0


def test_dataset_tokenizer_and_dataloader(tmp_path):
    for n in ("a.png", "b.png"):
        _png(tmp_path / n, size=(20, 12))
    write_metadata(tmp_path, [{"file_name": "a.png", "text": "a cat"}, {"file_name": "b.png", "text": "a dog"}])

    def tok(texts):                                 # stands in for CLIPTokenizer: list[str] -> [B, 77]
        return torch.tensor([[len(t)] * 77 for t in texts])

    ds = ImageFolderDataset(tmp_path, 8, tokenizer=tok)
    assert ds[1]["input_ids"].shape == (77,) and int(ds[1]["input_ids"][0]) == 5
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=2)))
    assert batch["pixel_values"].shape == (2, 3, 8, 8) and batch["input_ids"].shape == (2, 77)
    assert batch["text"] == ["a cat", "a dog"]


def test_dataset_skips_broken_images_with_warnings(tmp_path):
    _png(tmp_path / "good.png", color=(255, 0, 0))
    (tmp_path / "junk.png").write_bytes(b"GIF89a but not really")
    buf = (tmp_path / "good.png").read_bytes()
    Image.fromarray(_gradient(64, 64)).save(tmp_path / "trunc.png")
    (tmp_path / "trunc.png").write_bytes((tmp_path / "trunc.png").read_bytes()[:120])   # header ok, data cut
    write_metadata(tmp_path, [{"file_name": "junk.png", "text": "j"}, {"file_name": "trunc.png", "text": "t"},
                              {"file_name": "good.png", "text": "g"}])
    assert buf
    with pytest.warns(UserWarning, match="junk.png"):
        ds = ImageFolderDataset(tmp_path, 8)
    assert len(ds) == 2                                  # junk dropped when the dataset is built
    with pytest.warns(UserWarning, match="trunc.png"):
        item = ds[0]                                     # trunc fails to decode: the next readable image instead
    assert item["text"] == "g"
    with warnings.catch_warnings():
        warnings.simplefilter("error")                   # known broken: skipped silently from now on
        assert ds[0]["text"] == "g"
