"""The annotate page end to end in headless Chromium (Debian's /usr/bin/chromium, driven by Playwright; no browser
download): open, edit a caption, Enter, navigate with the keyboard, reload, filter — checking both the page and
metadata.jsonl on disk. `make setup` installs chromium; the test skips only when it truly cannot be had."""
import json

import pytest
from PIL import Image

from minidiff.annotate import serve

from browser import chromium_page, require_chromium  # tests/browser.py

sync_api, CHROMIUM = require_chromium()
expect = sync_api.expect


def rows(folder):
    return {r["file_name"]: r for r in map(json.loads, (folder / "metadata.jsonl").read_text("utf-8").splitlines())}


@pytest.fixture
def page(tmp_path):
    folder = tmp_path / "shapes"
    folder.mkdir()
    colours = {"a.png": (220, 30, 30), "b.png": (30, 160, 60), "c.png": (40, 60, 200)}
    for name, rgb in colours.items():
        Image.new("RGB", (64, 48), rgb).save(folder / name)
    (folder / "metadata.jsonl").write_text("".join(
        json.dumps({"file_name": n, "text": f"draft {n[0]}", "reviewed": False}) + "\n" for n in colours))
    server = serve(folder)
    try:
        with chromium_page(sync_api, CHROMIUM, {"width": 900, "height": 800}, 15_000) as pg:
            pg.goto(server.url)
            expect(pg.locator("body")).to_have_attribute("data-ready", "1")
            yield pg, folder, server
            pg.screenshot(path=str(tmp_path / "annotate.png"))
    finally:
        server.close()


def test_edit_enter_reload_in_chromium(page):
    pg, folder, server = page
    caption, count, name = pg.locator("#caption"), pg.locator("#count"), pg.locator("#name")
    expect(count).to_have_text("0 / 3")
    expect(name).to_have_text("a.png")
    expect(caption).to_have_value("draft a")
    expect(caption).to_be_focused()                                   # ready to type at once
    assert pg.eval_on_selector("#image", "img => img.complete && img.naturalWidth") == 64   # the image loaded

    # type, Enter: saved to disk at once, marked reviewed, and the next image is shown
    caption.fill("a red rectangle")
    pg.keyboard.press("Enter")
    expect(name).to_have_text("b.png")
    expect(count).to_have_text("1 / 3")
    expect(caption).to_have_value("draft b")
    assert rows(folder)["a.png"] == {"file_name": "a.png", "text": "a red rectangle", "reviewed": True}
    assert rows(folder)["b.png"]["reviewed"] is False

    # keyboard navigation: Alt+arrows while typing, plain arrows after Esc, PageUp/PageDown
    pg.keyboard.press("Alt+ArrowRight")
    expect(name).to_have_text("c.png")
    pg.keyboard.press("Escape")
    pg.keyboard.press("ArrowLeft")
    expect(name).to_have_text("b.png")
    expect(caption).not_to_be_focused()                              # browsing mode stays until Enter
    pg.keyboard.press("ArrowLeft")
    expect(name).to_have_text("a.png")
    pg.keyboard.press("ArrowRight")
    expect(name).to_have_text("b.png")
    pg.keyboard.press("PageUp")
    expect(name).to_have_text("a.png")
    expect(caption).to_have_value("a red rectangle")
    expect(pg.locator("#badge")).to_have_text("reviewed")
    pg.keyboard.press("PageDown")
    pg.keyboard.press("PageDown")
    expect(name).to_have_text("c.png")

    # an edit is not lost when moving away without Enter
    caption.fill("a blue rectangle")
    pg.keyboard.press("Alt+ArrowLeft")
    expect(name).to_have_text("b.png")
    expect(count).to_have_text("2 / 3")
    assert rows(folder)["c.png"]["text"] == "a blue rectangle"

    # reload: the same image comes back (its name is in the URL), everything saved is shown
    pg.reload()
    expect(pg.locator("body")).to_have_attribute("data-ready", "1")
    expect(name).to_have_text("b.png")
    expect(count).to_have_text("2 / 3")
    pg.keyboard.press("Alt+ArrowLeft")
    expect(caption).to_have_value("a red rectangle")

    # the filter: only un-reviewed images; saving the last one says so
    pg.keyboard.press("Escape")
    pg.keyboard.press("u")
    expect(pg.locator("#todo")).to_be_checked()
    expect(name).to_have_text("b.png")                                # a.png is reviewed: jumped to b.png
    expect(caption).to_have_value("draft b")                         # the key toggled the filter, typed nothing
    pg.keyboard.press("Enter")                                        # Enter outside the field: edit
    expect(caption).to_be_focused()
    caption.fill("a green rectangle")
    pg.keyboard.press("Enter")
    expect(count).to_have_text("3 / 3")
    expect(pg.locator("#status")).to_contain_text("all reviewed")

    final = rows(folder)
    assert [final[n]["text"] for n in ("a.png", "b.png", "c.png")] == \
           ["a red rectangle", "a green rectangle", "a blue rectangle"]
    assert all(r["reviewed"] for r in final.values())
    assert sorted(p.name for p in folder.iterdir()) == ["a.png", "b.png", "c.png", "metadata.jsonl"]


def test_failed_save_is_shown_and_does_not_advance(page):
    pg, folder, server = page
    (folder / "metadata.jsonl").write_text(json.dumps({"file_name": "b.png", "text": "x"}) + "\n")   # a.png gone
    pg.locator("#caption").fill("will not save")
    pg.keyboard.press("Enter")
    expect(pg.locator("#status")).to_contain_text("not saved")
    expect(pg.locator("#name")).to_have_text("a.png")
    assert "will not save" not in (folder / "metadata.jsonl").read_text()
