"""The `minidiff serve` page end to end in headless Chromium (Debian's /usr/bin/chromium, driven by Playwright, as
tests/test_annotate_browser.py does; no browser download), against a real uvicorn server on the embedded model:
type a prompt and Generate (preview frames, then the image), paint a mask and inpaint, drop a PNG that carries an
AUTOMATIC1111 infotext and see the fields filled — and the page never asks anything of any other address."""
import base64
import io
import json
import socket
import threading
import time

import numpy as np
import pytest
from PIL import Image

from browser import chromium_page, require_chromium  # tests/browser.py

sync_api, CHROMIUM = require_chromium()
uvicorn = pytest.importorskip("uvicorn", reason="the serve extra is not installed (pip install -e '.[test]')")
expect = sync_api.expect

from minidiff import infotext  # noqa: E402
from minidiff.serve.app import create_app  # noqa: E402

# an infotext as AUTOMATIC1111 1.9 writes it (Sampler + Schedule type, a quoted value)
A1111_TEXT = ("a blue square\nNegative prompt: red, green\n"
              "Steps: 13, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 5.5, Seed: 966911465, Size: 24x40, "
              "Model hash: 15012c538f, Model: realisticVisionV51_v51VAE, Lora hashes: \"207: fd0e0d7d115e\", "
              "Version: v1.9.3")


@pytest.fixture(scope="module")
def server():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = create_app()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 60
    while not srv.started and time.time() < deadline:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", app.state.server
    srv.should_exit = True
    thread.join(timeout=30)


@pytest.fixture
def page(server, tmp_path):
    url, state = server
    with chromium_page(sync_api, CHROMIUM, {"width": 1300, "height": 1100}, 30_000) as pg:
        requests = []
        pg.on("request", lambda r: requests.append(r))
        pg.goto(url + "/")
        expect(pg.locator("body")).to_have_attribute("data-ready", "1")
        yield pg, url, requests
        pg.screenshot(path=str(tmp_path / "serve.png"), full_page=True)
    foreign = [r.url for r in requests if not r.url.startswith((url + "/", "data:", "blob:"))]
    assert foreign == [], foreign                      # nothing but this server, ever


def events(pg):
    return pg.evaluate("window.minidiffEvents")


def test_type_generate_preview_then_image(page):
    pg, url, requests = page
    pg.get_by_label("Prompt", exact=True).fill("a red circle")
    pg.get_by_label("Negative prompt", exact=True).fill("green")
    pg.get_by_label("Steps", exact=True).fill("40")
    pg.get_by_label("CFG scale", exact=True).fill("6")
    pg.get_by_label("Sampler", exact=True).select_option("Euler a")
    pg.get_by_label("Seed", exact=True).fill("1234")
    pg.get_by_label("Preview every N steps", exact=True).fill("4")
    pg.get_by_role("button", name="Generate").click()
    result = pg.locator("#results img")
    expect(result).to_have_count(1)
    expect(pg.get_by_role("status")).to_contain_text("done: 1 image(s), seed 1234")
    shown = events(pg)
    previews = [e for e in shown if e.startswith("preview")]
    assert previews and shown.index(previews[0]) < shown.index("image 1234"), shown   # frames, then the image
    assert [int(e.split()[1]) for e in previews] == list(range(4, 40, 4))
    assert int(pg.locator("#preview").get_attribute("data-frames")) == len(previews)
    assert pg.eval_on_selector("#results img", "img => img.complete && img.naturalWidth") == 32
    assert "Sampler: Euler a, CFG scale: 6, Seed: 1234" in pg.locator("#info").inner_text()
    expect(pg.locator("#history li")).to_have_count(1)
    # the seed buttons: random (-1), then the last image's again
    pg.get_by_role("button", name="Random seed (-1)").click()
    expect(pg.get_by_label("Seed", exact=True)).to_have_value("-1")
    pg.get_by_role("button", name="Reuse the last image's seed").click()
    expect(pg.get_by_label("Seed", exact=True)).to_have_value("1234")
    # the page's request was AUTOMATIC1111's fields
    posted = [json.loads(r.post_data) for r in requests if r.url.endswith("/minidiff/jobs") and r.method == "POST"]
    assert posted[-1]["sampler_name"] == "Euler a" and posted[-1]["cfg_scale"] == 6 and posted[-1]["steps"] == 40
    # where words land: a slot that says whether this build has it
    if pg.evaluate("document.getElementById('explain').dataset.available") == "false":
        expect(pg.locator("#explainNote")).to_contain_text("not available in this build")
    else:
        pg.get_by_role("button", name="Where words land (history image 1)").click()
        expect(pg.locator("#words button").first).to_be_visible()
        expect(pg.locator("#explainImage")).to_be_visible()


def test_paint_a_mask_and_inpaint(page):
    pg, url, requests = page
    pg.get_by_label("Prompt", exact=True).fill("a red circle")
    pg.get_by_label("Steps", exact=True).fill("6")
    pg.get_by_label("Seed", exact=True).fill("5")
    pg.get_by_role("button", name="Generate").click()
    expect(pg.locator("#history li")).to_have_count(1)
    pg.get_by_role("button", name="Send to img2img (history image 1)").click()
    expect(pg.get_by_label("Init image", exact=True)).to_be_visible()
    canvas = pg.locator("#mask")
    expect(canvas).to_be_visible()
    pg.get_by_label("Brush size", exact=True).fill("6")
    box = canvas.bounding_box()                          # 256 px on screen for the 32 px picture: 8 screen px / px
    x0, y0 = box["x"] + box["width"] * 0.25, box["y"] + box["height"] * 0.5
    pg.mouse.move(x0, y0)
    pg.mouse.down()
    for k in range(1, 11):
        pg.mouse.move(x0 + k * box["width"] * 0.05, y0)
    pg.mouse.up()
    pg.get_by_label("Strength", exact=True).fill("0.9")
    pg.get_by_label("Mask blur", exact=True).fill("0")
    pg.get_by_label("Prompt", exact=True).fill("a blue square")
    pg.get_by_role("button", name="Generate").click()
    expect(pg.locator("#history li")).to_have_count(2)
    expect(pg.get_by_role("status")).to_contain_text("done: 1 image(s)")
    body = [json.loads(r.post_data) for r in requests if r.url.endswith("/minidiff/jobs") and r.method == "POST"][-1]
    assert body["mode"] == "img2img" and body["denoising_strength"] == 0.9 and body["mask_blur"] == 0
    mask = np.asarray(Image.open(io.BytesIO(base64.b64decode(body["mask"].split(",", 1)[1]))).convert("L"))
    assert mask.shape == (32, 32) and set(np.unique(mask)) == {0, 255}
    assert mask[16, 8:24].min() == 255 and mask[:6].max() == 0 and mask[-6:].max() == 0   # the stroke, only it
    info = pg.locator("#info").inner_text()
    assert info.startswith("a blue square") and "Denoising strength: 0.9" in info
    # what the painted mask did: the new picture is the old one outside it
    old = np.asarray(Image.open(io.BytesIO(base64.b64decode(body["init_images"][0].split(",", 1)[1])))
                     .convert("RGB"), dtype=np.int16)
    src = pg.eval_on_selector("#results img", "img => img.src")
    new = np.asarray(Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).convert("RGB"), dtype=np.int16)
    assert np.array_equal(new[mask == 0], old[mask == 0]) and np.abs(new[mask == 255] - old[mask == 255]).mean() > 1


def test_drop_a_png_with_an_a1111_infotext(page, tmp_path):
    pg, url, requests = page
    buf = io.BytesIO()
    Image.new("RGB", (24, 40), (10, 20, 200)).save(buf, format="PNG", pnginfo=infotext.png_info(A1111_TEXT))
    data = base64.b64encode(buf.getvalue()).decode()
    transfer = pg.evaluate_handle("""(b64) => {
        const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
        const dt = new DataTransfer();
        dt.items.add(new File([bytes], "from-a1111.png", { type: "image/png" }));
        return dt;
    }""", data)
    pg.dispatch_event("#prompt", "drop", {"dataTransfer": transfer})
    expect(pg.get_by_role("status")).to_contain_text("settings of from-a1111.png restored")
    expect(pg.get_by_label("Prompt", exact=True)).to_have_value("a blue square")
    expect(pg.get_by_label("Negative prompt", exact=True)).to_have_value("red, green")
    expect(pg.get_by_label("Steps", exact=True)).to_have_value("13")
    expect(pg.get_by_label("CFG scale", exact=True)).to_have_value("5.5")
    expect(pg.get_by_label("Seed", exact=True)).to_have_value("966911465")
    expect(pg.get_by_label("Sampler", exact=True)).to_have_value("DPM++ 2M Karras")
    expect(pg.get_by_label("Width", exact=True)).to_have_value("24")
    expect(pg.get_by_label("Height", exact=True)).to_have_value("40")
