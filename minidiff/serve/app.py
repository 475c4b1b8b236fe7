"""The ASGI app: AUTOMATIC1111's /sdapi/v1 routes, the page, and the page's own job routes, on one JobQueue.

    app = create_app(models=[None])              # None: the embedded model; paths: --model PATH ...
    uvicorn.run(app, host="127.0.0.1", port=7860)

Routes (AUTOMATIC1111's paths, fields and answers; see the README's "minidiff serve" for what is implemented):
    POST /sdapi/v1/txt2img  /sdapi/v1/img2img   -> {"images": [base64 PNG], "parameters": {...}, "info": "<json>"}
    GET  /sdapi/v1/progress                     -> {"progress", "eta_relative", "state", "current_image", "textinfo"}
    POST /sdapi/v1/interrupt                    GET /sdapi/v1/samplers  /sd-models  /embeddings  /loras
    GET|POST /sdapi/v1/options                  POST /sdapi/v1/png-info
The page's routes (minidiff's own):
    GET  /                                      the page (minidiff/serve/page.html)
    GET  /minidiff/config                       the model's own size and sampler, limits, whether explain exists
    POST /minidiff/jobs                         {"mode": "txt2img" | "img2img" | "explain", ...} -> {"id", "place"}
    GET  /minidiff/jobs/{id}?since=K            state, place, progress, previews from the K-th on, the answer
    DELETE /minidiff/jobs/{id}                  leave the line / interrupt
    GET  /minidiff/queue                        the running job and the waiting ones

Errors are JSON in AUTOMATIC1111's shape {"error": <kind>, "detail": <message>, "body": "", "errors": <message>}:
401 wrong credentials (--api-auth), 403 a foreign Host/Origin on a loopback server, 404 unknown route or job,
413 a body over MAX_BODY_BYTES, 422 bad input (the message names the field), 500 a job that failed, 503 queue full.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import importlib.util
import io
import json
import secrets
import time
from importlib import resources
from urllib.parse import urlsplit

import anyio
from PIL import Image, UnidentifiedImageError
from starlette.applications import Starlette
from starlette.requests import Request as HTTPRequest
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .. import infotext
from ..errors import InputValueError
from ..validation import NonFiniteError, check_generate_args
from . import a1111
from .jobs import Job, JobQueue, QueueFull, fix_seeds
from .preview import uses_vae
from .registry import Registry

MAX_BODY_BYTES = 50 * 1024 * 1024       # a request body (base64 pictures included)
LOOPBACK_NAMES = {"127.0.0.1", "localhost", "::1", "[::1]"}
# the page may load nothing from anywhere but this server (no CDN, no fonts, no analytics): the browser enforces it
PAGE_CSP = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src 'self' data: blob:; "
            "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
# library argument -> AUTOMATIC1111 field, to say which field a minidiff.validation message is about
LIBRARY_NAMES = {"guidance_scale": "cfg_scale", "scheduler": "sampler_name", "num_images": "batch_size",
                 "strength": "denoising_strength", "image": "init_images", "mask_image": "mask"}


class HTTPError(Exception):
    def __init__(self, status: int, detail: str, kind: str = "HTTPException", headers: dict | None = None):
        super().__init__(detail)
        self.status, self.detail, self.kind, self.headers = status, detail, kind, headers


def error_response(status: int, kind: str, detail: str, headers=None) -> JSONResponse:
    return JSONResponse({"error": kind, "detail": detail, "body": "", "errors": detail}, status_code=status,
                        headers=headers)


def explain_available() -> bool:
    """Is minidiff.explain (issue 21: per-word cross-attention maps) part of this build? Imported only when used."""
    return importlib.util.find_spec("minidiff.explain") is not None


def named(e: Exception) -> str:
    """A minidiff.validation message, prefixed by the AUTOMATIC1111 field when the library's name differs."""
    msg = str(e)
    first = msg.split(" ", 1)[0].split("[", 1)[0]
    return f"{LIBRARY_NAMES[first]}: {msg}" if first in LIBRARY_NAMES else msg


class Server:
    """The state behind the routes: models, the job queue, AUTOMATIC1111's options."""

    def __init__(self, models=(None,), embeddings=(), device="cpu", auth: str | None = None,
                 loopback_only: bool = True, loader=None):
        self.registry = Registry(models, embeddings, device=device, loader=loader)
        self.registry.pipe()                                   # the first model, loaded before the first request
        self.queue = JobQueue(self.registry)
        self.credentials = _credentials(auth)
        self.loopback_only = loopback_only
        self.options = {"show_progress_every_n_steps": 1, "samples_format": "png", "live_previews_enable": True,
                        "CLIP_stop_at_last_layers": 1, "eta_noise_seed_delta": 0, "sd_vae": "Automatic"}

    def option_values(self) -> dict:
        ckpt, pipe = self.registry.loaded() or (self.registry.current, None)
        return {**self.options, "sd_model_checkpoint": self.registry.current.title,
                "show_progress_type": "Full" if pipe is None or uses_vae(pipe) else "Approx cheap"}

    def close(self) -> None:
        self.queue.close()


def _credentials(auth: str | None) -> dict[str, str]:
    """--api-auth "user:pass[,user2:pass2]" -> {user: pass} (AUTOMATIC1111's format)."""
    if not auth:
        return {}
    out = {}
    for pair in auth.split(","):
        user, sep, password = pair.partition(":")
        if not sep or not user:
            raise InputValueError(f"--api-auth wants USER:PASS (several separated by commas), got {pair!r}",
                                  field="api_auth")
        out[user] = password
    return out


# ---------------------------------------------------------------------------------------------- plumbing
async def read_json(request: HTTPRequest):
    """The body as JSON, refused past MAX_BODY_BYTES (413) or when it is not JSON (422)."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > MAX_BODY_BYTES:
        raise HTTPError(413, f"the request body is {int(length)} bytes; the limit is {MAX_BODY_BYTES}",
                        "PayloadTooLarge")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise HTTPError(413, f"the request body is over the limit of {MAX_BODY_BYTES} bytes", "PayloadTooLarge")
        chunks.append(chunk)
    raw = b"".join(chunks)
    if not raw:
        return {}
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise HTTPError(422, f"the request body is not JSON: {e}", "JSONDecodeError") from None


def decode_image(data, name: str) -> Image.Image:
    """A base64 PNG (raw, or a data:image/...;base64, URL) -> a loaded PIL image; HTTP 422 naming the field if it is
    not base64, not an image, or over MAX_INPUT_PIXELS (checked from the header, before decoding the pixels)."""
    if not isinstance(data, str):
        raise HTTPError(422, f"{name} must be a base64 string, got {type(data).__name__}", "ValueError")
    if data.startswith("data:"):
        head, _, data = data.partition(",")
        if ";base64" not in head:
            raise HTTPError(422, f"{name}: a data: URL must be base64-encoded (data:image/png;base64,...)",
                            "ValueError")
    if data.startswith(("http://", "https://")):
        raise HTTPError(422, f"{name}: minidiff serve does not fetch URLs; send the picture as base64", "ValueError")
    try:
        raw = base64.b64decode(data.strip(), validate=False)
    except (binascii.Error, ValueError) as e:
        raise HTTPError(422, f"{name} is not valid base64: {e}", "ValueError") from None
    try:
        image = Image.open(io.BytesIO(raw))
        w, h = image.size
        if w * h > a1111.MAX_INPUT_PIXELS:
            raise HTTPError(422, f"{name} is {w}x{h} = {w * h / 1e6:.1f} megapixels; the limit is "
                                 f"{a1111.MAX_INPUT_PIXELS / 1e6:.1f} megapixels", "ValueError")
        image.load()
    except HTTPError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise HTTPError(422, f"{name} is not a readable image (PNG, JPEG, WebP...): {e}", "ValueError") from None
    return image


# ---------------------------------------------------------------------------------------------- the app
def create_app(models=(None,), embeddings=(), device="cpu", auth: str | None = None, loopback_only: bool = True,
               loader=None) -> Starlette:
    """The ASGI app (app.state.server: the Server). models: --model paths (None: the embedded model); auth:
    "USER:PASS" for HTTP basic auth on every route; loopback_only: refuse foreign Host/Origin headers (a server
    bound to 127.0.0.1: DNS rebinding and cross-site requests)."""
    server = Server(models, embeddings, device=device, auth=auth, loopback_only=loopback_only, loader=loader)

    # ------------------------------------------------------------------------------------------ submitting
    def new_job(body, mode: str) -> Job:
        """Read, check and queue a job; HTTP 422 for bad input (before it takes a place in the line)."""
        kind = mode
        if mode == "explain":
            if not explain_available():
                raise HTTPError(501, "where words land (minidiff.explain) is not available in this build",
                                "NotImplemented")
            mode = "txt2img"
        try:
            r = a1111.read_request(body, mode)
        except a1111.RequestError as e:
            raise HTTPError(422, str(e), "ValueError") from None
        ckpt = server.registry.current
        if r.checkpoint is not None:
            ckpt = server.registry.find(r.checkpoint)
            if ckpt is None:
                raise HTTPError(422, f"override_settings.sd_model_checkpoint {r.checkpoint!r} is not one of this "
                                     f"server's models: {', '.join(c.title for c in server.registry.checkpoints)}",
                                "ValueError")
        inputs = {}
        if mode == "img2img":
            inputs["images"] = [decode_image(s, f"init_images[{i}]") for i, s in enumerate(r.init_images)]
            if r.mask is not None:
                inputs["mask"] = decode_image(r.mask, "mask")
                if inputs["mask"].size != inputs["images"][0].size:
                    raise HTTPError(422, f"mask is {inputs['mask'].width}x{inputs['mask'].height} pixels but "
                                         f"init_images[0] is {inputs['images'][0].width}x"
                                         f"{inputs['images'][0].height}: they must have the same size", "ValueError")
        loaded = server.registry.loaded()
        if loaded is not None and loaded[0] is ckpt:     # the library's own checks, now (not after the line)
            try:
                check_generate_args(loaded[1], prompt=r.prompt, negative_prompt=r.negative_prompt, steps=r.steps,
                                    guidance_scale=r.cfg_scale, scheduler=r.sampler,
                                    seed=None if r.seed == -1 else r.seed, height=r.height, width=r.width,
                                    eta=0.0 if r.eta is None else r.eta)
                if mode == "img2img" and int(r.steps * r.denoising_strength) < 1:
                    raise ValueError(f"denoising_strength={r.denoising_strength} with steps={r.steps} leaves no "
                                     f"step to run (int(steps * denoising_strength) = 0)")
            except (TypeError, ValueError) as e:
                raise HTTPError(422, named(e), type(e).__name__) from None
        every = body.get("preview_every", server.options["show_progress_every_n_steps"]) \
            if isinstance(body, dict) else 1
        if isinstance(every, bool) or not isinstance(every, int) or every < 0:
            raise HTTPError(422, f"preview_every must be an int >= 0, got {every!r}", "ValueError")
        job = Job(kind, r, ckpt, preview_every=every, inputs=inputs)
        if r.task_id:
            job.id = r.task_id
        fix_seeds(job)
        try:
            return server.queue.submit(job)
        except QueueFull as e:
            raise HTTPError(503, str(e), "QueueFull") from None
        except ValueError as e:
            raise HTTPError(422, str(e), "ValueError") from None

    async def wait(job: Job) -> None:
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        job.on_done(lambda: loop.call_soon_threadsafe(lambda: done.done() or done.set_result(None)))
        await done

    def job_answer(job: Job) -> JSONResponse:
        """A finished txt2img / img2img job as AUTOMATIC1111 answers (an interrupted one: what it made)."""
        if job.state == "failed":
            e = job.error
            if isinstance(e, (TypeError, ValueError)):
                return error_response(422, type(e).__name__, named(e))
            if isinstance(e, NonFiniteError):
                return error_response(500, "NonFiniteError", str(e))
            return error_response(500, type(e).__name__, str(e))
        if job.result is None:
            return error_response(409, "Interrupted", "the job left the line before it ran")
        return JSONResponse(job.result)

    async def generate(request: HTTPRequest, mode: str):
        body = await read_json(request)
        job = await anyio.to_thread.run_sync(new_job, body, mode)     # decoding pictures: off the event loop
        await wait(job)
        return job_answer(job)

    async def txt2img(request):
        return await generate(request, "txt2img")

    async def img2img(request):
        return await generate(request, "img2img")

    # ------------------------------------------------------------------------------------------ state
    async def progress(request):
        job = server.queue.running
        skip = request.query_params.get("skip_current_image", "false").lower() in ("1", "true")
        if job is None:
            state = {"skipped": False, "interrupted": False, "stopping_generation": False, "job": "",
                     "job_count": 0, "job_timestamp": "0", "job_no": 0, "sampling_step": 0, "sampling_steps": 0}
            return JSONResponse({"progress": 0, "eta_relative": 0, "state": state, "current_image": None,
                                 "textinfo": None})
        p = max(job.progress(), 0.01)
        elapsed = time.time() - (job.started or time.time())
        state = {"skipped": False, "interrupted": job.interrupt.is_set(), "stopping_generation": False,
                 "job": job.kind, "job_count": job.image_count,
                 "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(job.started or job.created)),
                 "job_no": job.image_index, "sampling_step": job.step, "sampling_steps": job.steps}
        current = job.previews[-1][2] if job.previews and not skip else None
        return JSONResponse({"progress": p, "eta_relative": elapsed / p - elapsed, "state": state,
                             "current_image": base64.b64encode(current).decode() if current else None,
                             "textinfo": None})

    async def interrupt(request):
        server.queue.interrupt()
        return JSONResponse({})

    async def samplers(request):
        return JSONResponse(a1111.samplers_list())

    async def sd_models(request):
        items = await anyio.to_thread.run_sync(lambda: [c.item() for c in server.registry.checkpoints])
        return JSONResponse(items)

    async def options(request):
        if request.method == "GET":
            values = await anyio.to_thread.run_sync(server.option_values)
            return JSONResponse(values)
        body = await read_json(request)
        if not isinstance(body, dict):
            raise HTTPError(422, f"options must be a JSON object, got {type(body).__name__}", "ValueError")
        if "sd_model_checkpoint" in body:
            name = body["sd_model_checkpoint"]
            ckpt = server.registry.find(name) if isinstance(name, str) else None
            if ckpt is None:
                raise HTTPError(422, f"sd_model_checkpoint {name!r} is not one of this server's models "
                                     "(GET /sdapi/v1/sd-models lists them); a request cannot load other files",
                                "ValueError")
        if "show_progress_every_n_steps" in body:
            n = body["show_progress_every_n_steps"]
            if isinstance(n, bool) or not isinstance(n, int) or n < 0:
                raise HTTPError(422, f"show_progress_every_n_steps must be an int >= 0, got {n!r}", "ValueError")
            server.options["show_progress_every_n_steps"] = n
        if "sd_model_checkpoint" in body:
            server.registry.current = ckpt
        return JSONResponse(None)

    async def png_info(request):
        body = await read_json(request)
        if not isinstance(body, dict) or "image" not in body:
            raise HTTPError(422, "png-info wants {\"image\": <base64 PNG>}", "ValueError")
        image = await anyio.to_thread.run_sync(decode_image, body["image"], "image")
        text = infotext.read_png(image) or ""
        items = {k: v for k, v in image.info.items() if k != infotext.PNG_KEY and isinstance(v, (str, int, float))}
        return JSONResponse({"info": text, "items": items, "parameters": infotext.fields(text) if text else {}})

    async def embeddings(request):
        return JSONResponse(server.registry.embeddings)

    async def loras(request):
        return JSONResponse([])

    # ------------------------------------------------------------------------------------------ the page
    async def page(request):
        html = resources.files("minidiff.serve").joinpath("page.html").read_bytes()
        return Response(html, media_type="text/html; charset=utf-8",
                        headers={"Content-Security-Policy": PAGE_CSP, "Cache-Control": "no-store"})

    async def config(request):
        ckpt, pipe = server.registry.loaded()
        from ..schedulers import a1111_label, scheduler_name
        f = pipe.vae_scale_factor
        return JSONResponse({
            "model": ckpt.title, "models": [c.title for c in server.registry.checkpoints],
            "width": pipe.unet.config.sample_size * f, "height": pipe.unet.config.sample_size * f, "multiple": f,
            "sampler": a1111_label(scheduler_name(pipe.scheduler_config)),
            "samplers": a1111.sampler_labels(), "explain": explain_available(),
            "preview": "VAE" if uses_vae(pipe) else "Approx cheap",
            "max_images": a1111.MAX_IMAGES_PER_REQUEST, "max_output_pixels": a1111.MAX_OUTPUT_PIXELS})

    async def submit(request):
        body = await read_json(request)
        mode = body.get("mode", "txt2img") if isinstance(body, dict) else None
        if mode not in ("txt2img", "img2img", "explain"):
            raise HTTPError(422, f"mode must be txt2img, img2img or explain, got {mode!r}", "ValueError")
        job = await anyio.to_thread.run_sync(new_job, {k: v for k, v in body.items() if k != "mode"}, mode)
        return JSONResponse({"id": job.id, "place": server.queue.place(job)}, status_code=202)

    def find_job(request) -> Job:
        job = server.queue.get(request.path_params["id"])
        if job is None:
            raise HTTPError(404, f"no job {request.path_params['id']!r} (finished jobs are kept for a while only)",
                            "NotFound")
        return job

    async def job_status(request):
        job = find_job(request)
        if request.method == "DELETE":
            server.queue.cancel(job)
            return JSONResponse({"id": job.id, "state": job.state})
        since = request.query_params.get("since", "0")
        since = int(since) if since.isdigit() else 0
        out = {"id": job.id, "mode": job.kind, "state": job.state, "place": server.queue.place(job),
               "progress": job.progress(), "image": job.image_index, "images": job.image_count, "step": job.step,
               "steps": job.steps, "seed": job.seed, "preview_count": len(job.previews),
               "previews": [{"index": k, "step": s, "image": base64.b64encode(png).decode()}
                            for k, s, png in job.previews[since:]]}
        if job.done.is_set():
            answer = job_answer(job)
            out["status"] = answer.status_code
            out["result"] = json.loads(answer.body)
        return JSONResponse(out)

    async def queue_state(request):
        return JSONResponse(server.queue.snapshot())

    routes = [
        Route("/", page), Route("/minidiff/config", config), Route("/minidiff/jobs", submit, methods=["POST"]),
        Route("/minidiff/jobs/{id}", job_status, methods=["GET", "DELETE"]), Route("/minidiff/queue", queue_state),
        Route("/sdapi/v1/txt2img", txt2img, methods=["POST"]), Route("/sdapi/v1/img2img", img2img, methods=["POST"]),
        Route("/sdapi/v1/progress", progress), Route("/sdapi/v1/interrupt", interrupt, methods=["POST"]),
        Route("/sdapi/v1/samplers", samplers), Route("/sdapi/v1/sd-models", sd_models),
        Route("/sdapi/v1/options", options, methods=["GET", "POST"]),
        Route("/sdapi/v1/png-info", png_info, methods=["POST"]), Route("/sdapi/v1/embeddings", embeddings),
        Route("/sdapi/v1/loras", loras),
    ]

    async def on_http_error(request, e: HTTPError):
        return error_response(e.status, e.kind, e.detail, e.headers)

    async def on_http_exception(request, e):
        return error_response(e.status_code, "HTTPException", str(e.detail), getattr(e, "headers", None))

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        await anyio.to_thread.run_sync(server.close)           # the worker stops; a running job is interrupted

    from starlette.exceptions import HTTPException
    app = Starlette(routes=routes, exception_handlers={HTTPError: on_http_error, HTTPException: on_http_exception},
                    lifespan=lifespan)
    app.state.server = server
    return Guard(app, server)


class Guard:
    """ASGI middleware in front of every route: HTTP basic auth (--api-auth), and on a loopback server the Host and
    Origin checks that keep other web sites out (DNS rebinding; a page elsewhere POSTing to 127.0.0.1)."""

    def __init__(self, app, server: Server):
        self.app, self.server = app, server
        self.state = app.state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        refusal = self._refuse(headers)
        if refusal is not None:
            return await refusal(scope, receive, send)
        return await self.app(scope, receive, send)

    def _refuse(self, headers):
        if self.server.loopback_only:
            host = urlsplit("//" + headers.get("host", "")).hostname or ""
            if host not in LOOPBACK_NAMES and not host.startswith("127."):
                return error_response(403, "Forbidden", f"Host {headers.get('host')!r} is not this machine; the "
                                                        "server listens on loopback only (start it with --listen)")
        origin = headers.get("origin")
        if origin not in (None, "null"):
            o = urlsplit(origin)
            if o.netloc != headers.get("host"):
                return error_response(403, "Forbidden", f"requests from another site ({origin}) are refused")
        if self.server.credentials:
            user, password = _basic(headers.get("authorization", ""))
            expected = self.server.credentials.get(user)
            if expected is None or not secrets.compare_digest(password.encode(), expected.encode()):
                return error_response(401, "HTTPException", "Incorrect username or password",
                                      {"WWW-Authenticate": 'Basic realm="minidiff"'})
        return None


def _basic(header: str) -> tuple[str, str]:
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "basic":
        return "", ""
    try:
        user, _, password = base64.b64decode(value).decode("utf-8").partition(":")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return "", ""
    return user, password
