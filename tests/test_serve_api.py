"""`minidiff serve`'s AUTOMATIC1111 API through the ASGI test client, on the embedded model (32x32 images, a few steps).

The expected shapes are AUTOMATIC1111's, written from its source (modules/api/models.py, modules/api/api.py,
modules/processing.py Processed.js(), modules/shared_state.py State.dict(), the Lora extension's /sdapi/v1/loras),
not from minidiff's code. One server serves the whole module (one model load); tests that need other settings (auth,
several models) build their own."""
import base64
import io
import json
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("starlette", reason="the serve extra is not installed (pip install -e '.[test]')")
pytest.importorskip("httpx", reason="starlette's TestClient needs httpx (pip install -e '.[test]')")
from starlette.testclient import TestClient  # noqa: E402

from minidiff import infotext  # noqa: E402
from minidiff.checkpoint import DEFAULT_MODEL  # noqa: E402
from minidiff.cli import main  # noqa: E402
from minidiff.serve import app as app_module  # noqa: E402
from minidiff.serve.app import create_app  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BASE = "http://127.0.0.1:7860"

# AUTOMATIC1111's Processed.js() keys (modules/processing.py)
INFO_KEYS = {"prompt", "all_prompts", "negative_prompt", "all_negative_prompts", "seed", "all_seeds", "subseed",
             "all_subseeds", "subseed_strength", "width", "height", "sampler_name", "cfg_scale", "steps",
             "batch_size", "restore_faces", "face_restoration_model", "sd_model_name", "sd_model_hash",
             "sd_vae_name", "sd_vae_hash", "seed_resize_from_w", "seed_resize_from_h", "denoising_strength",
             "extra_generation_params", "index_of_first_image", "infotexts", "styles", "job_timestamp", "clip_skip",
             "is_using_inpainting_conditioning"}
# AUTOMATIC1111's State.dict() keys (modules/shared_state.py)
STATE_KEYS = {"skipped", "interrupted", "stopping_generation", "job", "job_count", "job_timestamp", "job_no",
              "sampling_step", "sampling_steps"}


@pytest.fixture(scope="module")
def client():
    app = create_app()
    yield TestClient(app, base_url=BASE)
    app.state.server.close()


def decode(b64: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    image.load()
    return image


def png_b64(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def wait_job(client, job_id, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        st = client.get(f"/minidiff/jobs/{job_id}").json()
        if "result" in st:
            return st
        time.sleep(0.02)
    raise AssertionError(f"job {job_id} did not finish")


def wait_until(fn, timeout=60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        v = fn()
        if v:
            return v
        time.sleep(0.01)
    raise AssertionError("timed out")


# ---------------------------------------------------------------------------------------------- txt2img / img2img
def test_txt2img_shape_defaults_and_infotext(client):
    r = client.post("/sdapi/v1/txt2img", json={"prompt": "a red circle", "steps": 4, "seed": 11})
    assert r.status_code == 200
    body = r.json()
    assert set(body) == {"images", "parameters", "info"}
    assert isinstance(body["info"], str) and len(body["images"]) == 1
    p = body["parameters"]     # AUTOMATIC1111's defaults for what the request left out
    assert (p["cfg_scale"], p["batch_size"], p["n_iter"], p["sampler_name"], p["sampler_index"]) == (7.0, 1, 1, None,
                                                                                                     "Euler")
    assert (p["negative_prompt"], p["styles"], p["subseed"], p["send_images"], p["save_images"]) == ("", None, -1,
                                                                                                      True, False)
    assert (p["prompt"], p["steps"], p["seed"]) == ("a red circle", 4, 11)
    assert (p["width"], p["height"]) == (32, 32)          # not given: the model's own size (README: sizes)
    info = json.loads(body["info"])
    assert INFO_KEYS <= set(info)
    assert (info["seed"], info["all_seeds"], info["sampler_name"], info["cfg_scale"], info["steps"]) == \
           (11, [11], "Euler", 7.0, 4)
    image = decode(body["images"][0])
    assert image.format == "PNG" and image.size == (32, 32)
    text = image.info["parameters"]
    assert text == info["infotexts"][0]
    ckpt = client.get("/sdapi/v1/sd-models").json()[0]
    assert text == (f"a red circle\nSteps: 4, Sampler: Euler, CFG scale: 7, Seed: 11, Size: 32x32, "
                    f"Model hash: {ckpt['hash']}, Model: {ckpt['model_name']}")


def test_same_pixels_as_minidiff_generate(client, tmp_path):
    r = client.post("/sdapi/v1/txt2img", json={"prompt": "a red circle", "negative_prompt": "blue", "seed": 7,
                                               "steps": 6, "sampler_name": "Euler a", "cfg_scale": 7, "batch_size": 2})
    api = [decode(b) for b in r.json()["images"]]
    for k, seed in enumerate((7, 8)):                      # image k of a batch has seed + k, as AUTOMATIC1111
        out = tmp_path / f"cli{seed}.png"
        assert main(["generate", "a red circle", "--negative", "blue", "--seed", str(seed), "--steps", "6",
                     "--scheduler", "euler_a", "--guidance", "7", "--upscale", "1", "--out", str(out)]) == 0
        cli = Image.open(out)
        assert np.array_equal(np.asarray(api[k].convert("RGB")), np.asarray(cli.convert("RGB")))
        assert api[k].info["parameters"] == cli.info["parameters"]      # the same infotext, too
        assert infotext.parse(cli.info["parameters"])["seed"] == seed


def test_img2img_inpaint_data_url_and_shape(client):
    base = decode(client.post("/sdapi/v1/txt2img", json={"prompt": "a red circle", "steps": 3, "seed": 1})
                  .json()["images"][0])
    mask = Image.new("L", base.size, 0)
    mask.paste(255, (8, 8, 24, 24))
    body = {"prompt": "a blue square", "steps": 8, "seed": 5, "init_images": ["data:image/png;base64," + png_b64(base)],
            "mask": png_b64(mask), "mask_blur": 0, "denoising_strength": 0.9, "sampler_name": "DDIM"}
    r = client.post("/sdapi/v1/img2img", json=body)
    assert r.status_code == 200, r.json()
    out = r.json()
    assert set(out) == {"images", "parameters", "info"}
    assert out["parameters"]["init_images"] is None and out["parameters"]["mask"] is None   # include_init_images
    assert out["parameters"]["inpainting_fill"] == 0 and out["parameters"]["resize_mode"] == 0
    info = json.loads(out["info"])
    assert info["denoising_strength"] == 0.9
    image = decode(out["images"][0])
    assert "Denoising strength: 0.9" in image.info["parameters"]
    a, b, m = (np.asarray(x, dtype=np.int16) for x in (image.convert("RGB"), base.convert("RGB"), mask))
    assert np.array_equal(a[m == 0], b[m == 0])           # outside the mask: the picture itself (as AUTOMATIC1111)
    assert np.abs(a[m == 255] - b[m == 255]).mean() > 1    # inside: repainted
    # inverted mask: the other region is repainted
    inv = client.post("/sdapi/v1/img2img", json={**body, "inpainting_mask_invert": 1}).json()
    a2 = np.asarray(decode(inv["images"][0]).convert("RGB"), dtype=np.int16)
    assert np.array_equal(a2[m == 255], b[m == 255])
    # plain image to image (no mask), with include_init_images echoed back
    r = client.post("/sdapi/v1/img2img", json={"prompt": "x", "steps": 4, "init_images": [png_b64(base)],
                                               "include_init_images": True})
    assert r.status_code == 200 and r.json()["parameters"]["init_images"] == [png_b64(base)]


# ---------------------------------------------------------------------------------------------- the other routes
def test_samplers_models_options_embeddings_loras(client):
    samplers = client.get("/sdapi/v1/samplers").json()
    assert all(set(s) == {"name", "aliases", "options"} for s in samplers)
    names = {s["name"] for s in samplers}
    assert {"Euler a", "Euler", "LMS", "LMS Karras", "DPM++ 2M", "DPM++ 2M Karras", "DDIM", "PLMS"} <= names
    euler_a = next(s for s in samplers if s["name"] == "Euler a")
    assert {"k_euler_a", "k_euler_ancestral"} <= set(euler_a["aliases"])
    models = client.get("/sdapi/v1/sd-models").json()
    assert len(models) == 1 and set(models[0]) == {"title", "model_name", "hash", "sha256", "filename", "config"}
    m = models[0]
    assert m["sha256"] == infotext.model_hash(DEFAULT_MODEL) and m["hash"] == m["sha256"][:10]
    assert m["title"] == f"minidiff-shapes [{m['hash']}]" and m["model_name"] == "minidiff-shapes"
    opts = client.get("/sdapi/v1/options").json()
    assert opts["sd_model_checkpoint"] == m["title"]
    assert client.get("/sdapi/v1/embeddings").json() == {"loaded": {}, "skipped": {}}
    assert client.get("/sdapi/v1/loras").json() == []
    assert client.post("/sdapi/v1/interrupt").json() == {}      # nothing running: nothing happens
    idle = client.get("/sdapi/v1/progress").json()
    assert set(idle) == {"progress", "eta_relative", "state", "current_image", "textinfo"}
    assert set(idle["state"]) == STATE_KEYS and idle["progress"] == 0 and idle["current_image"] is None


def test_png_info(client):
    b64 = client.post("/sdapi/v1/txt2img", json={"prompt": "a red circle", "negative_prompt": "green, blue",
                                                 "steps": 2, "seed": 3}).json()["images"][0]
    r = client.post("/sdapi/v1/png-info", json={"image": b64}).json()
    assert set(r) == {"info", "items", "parameters"}
    assert r["info"].startswith("a red circle\nNegative prompt: green, blue\nSteps: 2")
    p = r["parameters"]
    assert (p["Prompt"], p["Negative prompt"], p["Steps"], p["Seed"], p["Size-1"], p["Size-2"]) == \
           ("a red circle", "green, blue", "2", "3", "32", "32")
    plain = client.post("/sdapi/v1/png-info", json={"image": png_b64(Image.new("RGB", (4, 4)))}).json()
    assert plain["info"] == "" and plain["parameters"] == {}


def test_page_is_served_with_its_policy(client):
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "connect-src 'self'" in r.headers["content-security-policy"]
    html = r.text
    for name in ("Prompt", "Negative prompt", "Generate", "Interrupt", "Seed", "Steps", "CFG scale", "Sampler",
                 "Strength"):
        assert f">{name}<" in html, name                 # each control's accessible name (its <label> or text)
    assert "http://" not in html and "https://" not in html  # nothing to load from elsewhere
    config = client.get("/minidiff/config").json()
    assert (config["width"], config["height"], config["sampler"], config["preview"]) == (32, 32, "DDIM", "VAE")


# ------------------------------------------------------------------------------------ queue, progress, interrupt
def test_queue_order_progress_and_interrupt(client):
    blocker = client.post("/minidiff/jobs", json={"mode": "txt2img", "prompt": "long", "steps": 900, "seed": 1,
                                                  "preview_every": 5}).json()
    wait_until(lambda: client.get(f"/minidiff/jobs/{blocker['id']}").json()["step"] >= 6)
    jobs = [client.post("/minidiff/jobs", json={"mode": "txt2img", "prompt": p, "steps": 3, "seed": 1}).json()
            for p in ("first", "second", "third")]
    assert [j["place"] for j in jobs] == [1, 2, 3]                      # behind the running one, in order
    line = client.get("/minidiff/queue").json()
    assert [(x["prompt"], x["place"]) for x in line] == [("long", 0), ("first", 1), ("second", 2), ("third", 3)]
    # /progress answers while the job runs, with a preview of the predicted image
    prog = wait_until(lambda: (p := client.get("/sdapi/v1/progress").json())["current_image"] and p)
    assert prog["state"]["job"] == "txt2img" and prog["state"]["sampling_steps"] == 900
    assert 0 < prog["progress"] < 1 and prog["eta_relative"] > 0
    assert decode(prog["current_image"]).size == (32, 32)
    assert client.get("/sdapi/v1/progress?skip_current_image=true").json()["current_image"] is None
    assert client.get("/").status_code == 200                            # the page too
    # interrupt: the running job stops between two steps and returns what it made; the line goes on
    assert client.post("/sdapi/v1/interrupt").json() == {}
    st = wait_job(client, blocker["id"])
    assert st["state"] == "interrupted" and st["status"] == 200 and st["step"] < 900
    assert len(st["result"]["images"]) == 1 and decode(st["result"]["images"][0]).size == (32, 32)
    assert len(st["previews"]) >= 1 and all(f["step"] % 5 == 0 for f in st["previews"])
    done = [wait_job(client, j["id"]) for j in jobs]
    assert all(d["state"] == "done" for d in done)
    server = client.app.state.server
    started = [server.queue.get(j["id"]).started for j in jobs]
    finished = [server.queue.get(j["id"]).finished for j in jobs]
    assert started == sorted(started) and finished[0] <= started[1] and finished[1] <= started[2]


def test_interrupt_mid_batch_through_the_api(client):
    answer = {}
    t = threading.Thread(target=lambda: answer.update(r=client.post(
        "/sdapi/v1/txt2img", json={"prompt": "a red circle", "steps": 900, "batch_size": 3, "seed": 2})))
    t.start()
    wait_until(lambda: client.get("/sdapi/v1/progress").json()["state"]["sampling_step"] >= 3)
    client.post("/sdapi/v1/interrupt")
    t.join(60)
    r = answer["r"]
    assert r.status_code == 200
    info = json.loads(r.json()["info"])
    assert len(r.json()["images"]) == 1 and len(info["infotexts"]) == 1     # the first image, as far as it got


def test_cancel_a_waiting_job(client):
    blocker = client.post("/minidiff/jobs", json={"mode": "txt2img", "prompt": "long", "steps": 900}).json()
    waiting = client.post("/minidiff/jobs", json={"mode": "txt2img", "prompt": "never", "steps": 3}).json()
    assert client.delete(f"/minidiff/jobs/{waiting['id']}").json()["state"] == "interrupted"
    client.delete(f"/minidiff/jobs/{blocker['id']}")
    assert wait_job(client, blocker["id"])["state"] == "interrupted"
    w = wait_job(client, waiting["id"])
    assert w["status"] == 409 and w["step"] == 0
    assert client.get("/minidiff/jobs/nope").status_code == 404


# ---------------------------------------------------------------------------------------------- bad input
BAD = [
    ("txt2img", {"steps": 0}, "steps must be an int in [1,"),
    ("txt2img", {"steps": "ten"}, "steps must be an int"),
    ("txt2img", {"steps": 2.5}, "steps must be an int"),
    ("txt2img", {"cfg_scale": "high"}, "cfg_scale: guidance_scale must be a finite number"),
    ("txt2img", {"cfg_scale": -1}, "cfg_scale: guidance_scale must be a finite number >= 0"),
    ("txt2img", {"prompt": 5}, "prompt must be a string"),
    ("txt2img", {"seed": -5}, "seed must be an int in [0,"),
    ("txt2img", {"width": 30}, "width must be a positive multiple of 4"),
    ("txt2img", {"width": 4096, "height": 4096}, "width x height must be at most 4194304 pixels"),
    ("txt2img", {"sampler_name": "DPM++ 3M SDE"}, "sampler_name: unknown sampler 'DPM++ 3M SDE'"),
    ("txt2img", {"scheduler": "Exponential"}, "scheduler must be one of Automatic, Karras"),
    ("txt2img", {"batch_size": 0}, "batch_size must be an int >= 1"),
    ("txt2img", {"batch_size": 20, "n_iter": 20}, "batch_size x n_iter must be at most 100"),
    ("txt2img", {"override_settings": {"sd_model_checkpoint": "/etc/passwd"}},
     "override_settings.sd_model_checkpoint '/etc/passwd' is not one of this server's models"),
    ("img2img", {}, "init_images must be a non-empty list"),
    ("img2img", {"init_images": ["aGVsbG8gd29ybGQ="]}, "init_images[0] is not a readable image"),
    ("img2img", {"init_images": ["not base64 at all!"]}, "init_images[0]"),
    ("img2img", {"init_images": ["http://example.com/a.png"]}, "does not fetch URLs"),
    ("img2img", {"denoising_strength": 1.5}, "denoising_strength must be a number in [0, 1]"),
    ("img2img", {"denoising_strength": 0.1, "steps": 5}, "leaves no step to run"),
    ("img2img", {"mask": "aGVsbG8="}, "mask is not a readable image"),
    ("img2img", {"inpainting_mask_invert": 2}, "inpainting_mask_invert must be 0"),
]


@pytest.mark.parametrize("mode, fields, message", BAD, ids=[f"{m}-{'-'.join(f)}" for m, f, _ in BAD])
def test_bad_input_is_422_naming_the_field(client, mode, fields, message):
    body = {"prompt": "x", "steps": 3, **fields}
    if mode == "img2img" and "init_images" not in fields and fields:
        body["init_images"] = [png_b64(Image.new("RGB", (32, 32), (200, 20, 20)))]
    r = client.post(f"/sdapi/v1/{mode}", json=body)
    assert r.status_code == 422, r.json()
    err = r.json()
    assert set(err) == {"error", "detail", "body", "errors"} and message in err["detail"], err


def test_bad_bodies_and_the_server_goes_on(client, monkeypatch):
    big = Image.new("L", (7100, 7100))                         # 50.4 megapixels (a flat PNG: ~60 kB)
    r = client.post("/sdapi/v1/img2img", json={"prompt": "x", "init_images": [png_b64(big)]})
    assert r.status_code == 422 and "50.4 megapixels; the limit is 16.8" in r.json()["detail"]
    mask = png_b64(Image.new("L", (16, 16)))
    r = client.post("/sdapi/v1/img2img", json={"init_images": [png_b64(Image.new("RGB", (32, 32)))], "mask": mask})
    assert r.status_code == 422 and "mask is 16x16 pixels but init_images[0] is 32x32" in r.json()["detail"]
    r = client.post("/sdapi/v1/txt2img", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422 and "not JSON" in r.json()["detail"]
    assert client.post("/sdapi/v1/txt2img", json=[1, 2]).status_code == 422
    monkeypatch.setattr(app_module, "MAX_BODY_BYTES", 1000)
    r = client.post("/sdapi/v1/txt2img", json={"prompt": "x" * 2000})
    assert r.status_code == 413 and "limit" in r.json()["detail"]
    monkeypatch.undo()
    # a job that fails while running (NaN latents from a huge guidance scale) fails alone
    r = client.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 3, "cfg_scale": 1e300})
    assert r.status_code == 500 and r.json()["error"] == "NonFiniteError" and "NaN" in r.json()["detail"]
    r = client.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 3, "seed": 1})
    assert r.status_code == 200 and len(r.json()["images"]) == 1
    assert client.get("/sdapi/v1/nope").status_code == 404


# ---------------------------------------------------------------------------------------------- models, auth, hosts
def test_models_switch_only_among_those_given_and_embeddings(tmp_path):
    other = tmp_path / "shapes-copy"
    shutil.copytree(DEFAULT_MODEL, other)
    import torch
    from minidiff.formats.embeddings import save_embedding
    emb = save_embedding(tmp_path / "mytoken.safetensors", "mytoken", torch.randn(2, 64))
    app = create_app(models=[None, str(other)], embeddings=[str(emb)])
    try:
        c = TestClient(app, base_url=BASE)
        models = c.get("/sdapi/v1/sd-models").json()
        assert [m["model_name"] for m in models] == ["minidiff-shapes", "shapes-copy"]
        e = c.get("/sdapi/v1/embeddings").json()
        assert e == {"loaded": {"mytoken": {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None,
                                            "shape": 64, "vectors": 2}}, "skipped": {}}
        bad = c.post("/sdapi/v1/options", json={"sd_model_checkpoint": str(DEFAULT_MODEL.parent / "elsewhere")})
        assert bad.status_code == 422 and "not one of this server's models" in bad.json()["detail"]
        assert c.post("/sdapi/v1/options", json={"sd_model_checkpoint": models[1]["title"]}).status_code == 200
        assert c.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == models[1]["title"]
        r = c.post("/sdapi/v1/txt2img", json={"prompt": "mytoken", "steps": 2}).json()
        assert json.loads(r["info"])["sd_model_name"] == "shapes-copy"
        assert "Model: shapes-copy" in decode(r["images"][0]).info["parameters"]
        # per request, by the path given on the command line
        r = c.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 2,
                                              "override_settings": {"sd_model_checkpoint": "minidiff-shapes"}}).json()
        assert json.loads(r["info"])["sd_model_name"] == "minidiff-shapes"
    finally:
        app.state.server.close()


def test_auth_on_every_route():
    app = create_app(auth="ann:s3cret,bob:pw")
    try:
        c = TestClient(app, base_url=BASE)
        for path in ("/", "/sdapi/v1/samplers", "/sdapi/v1/progress", "/minidiff/config"):
            r = c.get(path)
            assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Basic"), path
        assert c.get("/sdapi/v1/samplers", auth=("ann", "wrong")).status_code == 401
        assert c.post("/sdapi/v1/txt2img", json={"steps": 1}).status_code == 401
        assert c.get("/sdapi/v1/samplers", auth=("ann", "s3cret")).status_code == 200
        assert c.get("/", auth=("bob", "pw")).status_code == 200
        r = c.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 2}, auth=("bob", "pw"))
        assert r.status_code == 200
    finally:
        app.state.server.close()
    with pytest.raises(ValueError, match="USER:PASS"):
        create_app(auth="nopassword")


def test_foreign_host_and_origin_are_refused(client):
    assert client.get("/sdapi/v1/samplers", headers={"host": "evil.example"}).status_code == 403
    r = client.post("/sdapi/v1/interrupt", headers={"origin": "http://evil.example"})
    assert r.status_code == 403 and "another site" in r.json()["detail"]
    assert client.post("/sdapi/v1/interrupt", headers={"origin": BASE}).status_code == 200


# ---------------------------------------------------------------------------------------------- where words land
def test_where_words_land_missing(client, monkeypatch):
    monkeypatch.setattr(app_module, "explain_available", lambda: False)
    assert client.get("/minidiff/config").json()["explain"] is False
    r = client.post("/minidiff/jobs", json={"mode": "explain", "prompt": "a red circle", "seed": 1, "steps": 4})
    assert r.status_code == 501 and "not available in this build" in r.json()["detail"]


def test_where_words_land_present(client):
    pytest.importorskip("minidiff.explain", reason="minidiff.explain (issue 21) is not in this build")
    assert client.get("/minidiff/config").json()["explain"] is True
    job = client.post("/minidiff/jobs", json={"mode": "explain", "prompt": "a red circle", "seed": 1,
                                              "steps": 4}).json()
    st = wait_job(client, job["id"])
    assert st["state"] == "done", st
    words = st["result"]["words"]
    assert "circle" in words and set(st["result"]["overlays"]) == set(words)
    assert decode(st["result"]["overlays"]["circle"]).size == decode(st["result"]["image"]).size


# ---------------------------------------------------------------------------------------------- the real server
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_minidiff_serve_subprocess_real_http():
    port = free_port()
    env = {**__import__("os").environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "minidiff", "serve", "--port", str(port)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # Ctrl+C as in a terminal
    try:
        line = proc.stdout.readline()
        assert f"http://127.0.0.1:{port}/" in line, line
        url = f"http://127.0.0.1:{port}"

        def up():
            try:
                return urllib.request.urlopen(f"{url}/sdapi/v1/samplers", timeout=2).status == 200
            except OSError:
                return False
        wait_until(up, timeout=60)
        req = urllib.request.Request(f"{url}/sdapi/v1/txt2img", method="POST",
                                     data=json.dumps({"prompt": "a red circle", "steps": 3, "seed": 4}).encode(),
                                     headers={"Content-Type": "application/json"})
        body = json.loads(urllib.request.urlopen(req, timeout=60).read())
        image = decode(body["images"][0])
        assert image.size == (32, 32) and "Seed: 4" in image.info["parameters"]
    finally:
        proc.send_signal(signal.SIGINT)                 # Ctrl+C
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err[-2000:]
    assert "stopped" in out and "Traceback" not in err


def test_serve_without_the_extra_says_what_to_install(monkeypatch, capsys):
    from minidiff.commands import serve as cmd
    real = cmd.importlib.util.find_spec
    monkeypatch.setattr(cmd.importlib.util, "find_spec", lambda name: None if name == "starlette" else real(name))
    assert main(["serve"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "pip install 'minidiff[serve]'" in err and "starlette" in err


def test_readme_lists_every_ignored_field():
    from minidiff.serve import a1111
    readme = (ROOT / "README.md").read_text("utf-8")
    section = readme[readme.index("## `minidiff serve`"):]
    missing = [f for f in sorted(set(a1111.IGNORED_TXT2IMG) | set(a1111.IGNORED_IMG2IMG)) if f"`{f}`" not in section]
    assert missing == []
