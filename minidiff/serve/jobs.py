"""One worker, one queue: every generation (from the page or from the API) is a Job, run first-in first-out by a
single thread, so the model is never used by two requests at once and each job's place in the line is known.

    queue = JobQueue(registry)                   # starts the worker thread
    job = queue.submit(Job("txt2img", request, checkpoint))
    queue.place(job)                             # 0: running, k: k-th in line, None: finished
    job.done.wait(); job.result                  # AUTOMATIC1111's answer {"images", "parameters", "info"}
    queue.interrupt()                            # the running job stops between two steps, keeps what it made

A job that fails (bad input the model refuses, NaN latents, ...) fails alone: its error is kept on the job and the
worker takes the next one. Interrupting raises JobInterrupted from the sampling callback, after a step; the image in
progress is then decoded from its last predicted x̂₀ and returned with the ones already finished (AUTOMATIC1111
returns its last "denoised" latents too).
"""
from __future__ import annotations

import base64
import io
import threading
import time
import traceback
import uuid
from collections import OrderedDict, deque
from dataclasses import dataclass, field

from PIL import Image, ImageFilter, ImageOps

from .. import infotext
from ..pipeline import strength_timesteps, to_pil
from . import a1111
from .preview import X0Probe, to_rgb

MAX_QUEUED = 100            # jobs waiting; one more is refused (HTTP 503)
KEEP_FINISHED = 20          # finished jobs kept for the page to read back (their pictures stay in memory)


class JobInterrupted(Exception):
    """Raised from the sampling callback when the running job is interrupted."""


@dataclass
class Job:
    kind: str                                # "txt2img" | "img2img" | "explain"
    request: object                          # a1111.Request (explain: the same, for the image to explain)
    checkpoint: object                       # registry.Checkpoint
    preview_every: int = 1                   # a preview every N steps (0: none)
    inputs: dict = field(default_factory=dict)   # decoded pictures: {"images": [PIL], "mask": PIL | None}
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    state: str = "queued"                    # queued | running | done | interrupted | failed
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    seed: int = -1                           # fixed at submission (-1 drawn then), so the answer can say it
    subseed: int = -1
    image_index: int = 0                     # progress: image i of image_count, step of steps
    image_count: int = 1
    step: int = 0
    steps: int = 0
    previews: list = field(default_factory=list)     # [(image index, step, PNG bytes)], every preview_every steps
    result: dict | None = None
    error: BaseException | None = None
    traceback: str | None = None
    interrupt: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)
    _waiters: list = field(default_factory=list)

    def on_done(self, fn) -> None:
        """Call fn() when the job ends (at once if it has)."""
        self._waiters.append(fn)
        if self.done.is_set():
            fn()

    def finish(self, state: str) -> None:
        self.state, self.finished = state, time.time()
        self.done.set()
        for fn in self._waiters:
            fn()

    def progress(self) -> float:
        """0..1 over all images of the job."""
        per_image = self.step / self.steps if self.steps else 0.0
        return min(1.0, (self.image_index + per_image) / max(1, self.image_count))


class JobQueue:
    def __init__(self, registry, max_queued: int = MAX_QUEUED):
        self.registry = registry
        self.max_queued = max_queued
        self.pending: deque[Job] = deque()
        self.running: Job | None = None
        self.jobs: OrderedDict[str, Job] = OrderedDict()   # every job not yet forgotten, oldest first
        self.cond = threading.Condition()
        self._closed = False
        self.thread = threading.Thread(target=self._work, name="minidiff-serve-worker", daemon=True)
        self.thread.start()

    # ------------------------------------------------------------------------------------------ the line
    def submit(self, job: Job) -> Job:
        with self.cond:
            if self._closed:
                raise QueueFull("the server is stopping")
            if len(self.pending) >= self.max_queued:
                raise QueueFull(f"{len(self.pending)} jobs are waiting, the most this server queues; retry later")
            if job.id in self.jobs:
                raise ValueError(f"force_task_id {job.id!r} is already a job of this server")
            self.pending.append(job)
            self.jobs[job.id] = job
            self._forget_old()
            self.cond.notify()
        return job

    def place(self, job: Job) -> int | None:
        """0: running; k >= 1: k-th waiting (k - 1 jobs before it); None: finished."""
        with self.cond:
            if job is self.running:
                return 0
            try:
                return self.pending.index(job) + 1
            except ValueError:
                return None

    def get(self, job_id: str) -> Job | None:
        return self.jobs.get(job_id)

    def interrupt(self) -> None:
        """Stop the running job between two steps (AUTOMATIC1111's /sdapi/v1/interrupt); the line goes on."""
        with self.cond:
            if self.running is not None:
                self.running.interrupt.set()

    def cancel(self, job: Job) -> None:
        """A waiting job leaves the line (finished as "interrupted", no images); the running one is interrupted."""
        with self.cond:
            if job in self.pending:
                self.pending.remove(job)
                job.result = None
                job.finish("interrupted")
            elif job is self.running:
                job.interrupt.set()

    def snapshot(self) -> list[dict]:
        """The running job and the waiting ones, in order."""
        with self.cond:
            line = ([self.running] if self.running else []) + list(self.pending)
            return [{"id": j.id, "mode": j.kind, "prompt": j.request.prompt, "place": i,
                     "state": j.state} for i, j in enumerate(line, start=0 if self.running else 1)]

    def shutdown(self) -> None:
        """Stop taking jobs: the running one is interrupted (its request gets what it made), the waiting ones fail
        ("the server stopped"). Returns at once; close() also waits for the worker."""
        with self.cond:
            self._closed = True
            if self.running is not None:
                self.running.interrupt.set()
            self.cond.notify_all()

    def close(self) -> None:
        self.shutdown()
        self.thread.join(timeout=30)

    def _forget_old(self) -> None:
        finished = [k for k, j in self.jobs.items() if j.done.is_set()]
        for k in finished[:max(0, len(finished) - KEEP_FINISHED)]:
            del self.jobs[k]

    # ------------------------------------------------------------------------------------------ the worker
    def _work(self) -> None:
        while True:
            with self.cond:
                while not self.pending and not self._closed:
                    self.cond.wait()
                if self._closed:
                    for job in self.pending:
                        job.error = RuntimeError("the server stopped before this job ran")
                        job.finish("failed")
                    return
                job = self.running = self.pending.popleft()
                job.state, job.started = "running", time.time()
            state = "done"
            try:
                pipe = self.registry.pipe(job.checkpoint)
                run = run_explain if job.kind == "explain" else run_generation
                state = run(job, pipe)
            except BaseException as e:           # the job fails alone; the worker lives on
                job.error = e
                job.traceback = traceback.format_exc()
                state = "failed"
            finally:
                with self.cond:
                    self.running = None
                job.finish(state)


class QueueFull(RuntimeError):
    """More jobs are waiting than the server queues (HTTP 503)."""


# ---------------------------------------------------------------------------------------------- running one job
def png_bytes(image: Image.Image, text: str | None = None) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=infotext.png_info(text) if text else None)
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def count_steps(pipe, r) -> int:
    """How many sampling steps (callback calls) one image takes: PNDM runs one more than asked (its warm-up), image
    to image only the last int(steps·strength)."""
    sched = pipe.make_scheduler(r.sampler)
    sched.set_timesteps(r.steps)
    if r.mode == "img2img":
        return len(strength_timesteps(sched, r.steps, r.denoising_strength))
    return len(sched.timesteps)


def prepare_mask(mask: Image.Image, r) -> Image.Image:
    """AUTOMATIC1111's inpainting mask: white (or alpha) = repaint, inverted on request, blurred by mask_blur
    (a Gaussian of σ = mask_blur pixels in x and y; AUTOMATIC1111 blurs with OpenCV, this with PIL)."""
    if mask.mode == "RGBA" and mask.getextrema()[-1] != (255, 255):      # transparent = repaint, as AUTOMATIC1111
        mask = mask.split()[-1].point(lambda v: 255 if v > 128 else 0)
    mask = mask.convert("L")
    if r.inpainting_mask_invert:
        mask = ImageOps.invert(mask)
    if any(r.mask_blur):
        mask = mask.filter(ImageFilter.GaussianBlur(r.mask_blur))
    return mask


def run_generation(job: Job, pipe) -> str:
    """txt2img / img2img: one generate() call per image (seed, seed + 1, ...: each image is what `minidiff generate
    --seed` makes with its seed), AUTOMATIC1111's answer in job.result. Returns the job's final state."""
    r = job.request
    f = pipe.vae_scale_factor
    native = pipe.unet.config.sample_size * f
    width, height = r.width or native, r.height or native
    r.parameters.update(width=width, height=height)    # the size used (not given: the model's own, see README)
    n = r.batch_size * r.n_iter
    job.image_count, job.steps = n, count_steps(pipe, r)
    pictures = job.inputs.get("images", [])
    mask = prepare_mask(job.inputs["mask"], r) if job.inputs.get("mask") is not None else None
    ckpt = job.checkpoint
    images, texts = [], []
    state = "done"
    last = {}

    def callback(i, t, latents):
        job.step, last["t"] = i + 1, t
        if job.preview_every and (i + 1) % job.preview_every == 0 and i + 1 < job.steps:
            x0 = probe.predicted_x0(t)
            if x0 is not None:
                job.previews.append((job.image_index, i + 1, png_bytes(to_pil(to_rgb(pipe, x0))[0])))
        if job.interrupt.is_set():
            raise JobInterrupted

    with X0Probe(pipe, r.cfg_scale) as probe:
        for k in range(n):
            job.image_index, job.step = k, 0
            picture = {}
            if r.mode == "img2img":
                picture = {"image": pictures[k % len(pictures)], "strength": r.denoising_strength}
                if mask is not None:
                    picture["mask_image"] = mask
            try:
                image = pipe.generate(r.prompt, negative_prompt=r.negative_prompt, steps=r.steps,
                                      guidance_scale=r.cfg_scale, scheduler=r.sampler, seed=job.seed + k,
                                      height=height, width=width, progress=False, callback=callback,
                                      eta=0.0 if r.eta is None else r.eta, **picture)[0]
            except JobInterrupted:
                x0 = probe.predicted_x0(last["t"]) if "t" in last else None
                image = to_pil(pipe.decode_latents(x0.to(pipe.dtype)))[0] if x0 is not None else None
                state = "interrupted"
            if image is not None:
                if mask is not None:   # AUTOMATIC1111: the picture itself outside the (blurred) mask
                    image = Image.composite(image, picture["image"].convert("RGB").resize(image.size, Image.LANCZOS),
                                            mask.resize(image.size, Image.LANCZOS))
                extras = {"Mask blur": r.mask_blur[0]} if mask is not None and r.mask_blur[0] == r.mask_blur[1] \
                    else {}
                text = infotext.format(r.prompt, r.negative_prompt, steps=r.steps, sampler_name=r.sampler_label,
                                       cfg_scale=r.cfg_scale, seed=job.seed + k, width=image.width,
                                       height=image.height, model_hash=ckpt.short_hash, model=ckpt.model_name,
                                       denoising_strength=r.denoising_strength if r.mode == "img2img" else None,
                                       extras=extras)
                images.append(png_bytes(image, text))
                texts.append(text)
            if state == "interrupted":
                break
    info = a1111.processed_info(r, seed=job.seed, subseed=job.subseed, n=len(texts) or n, width=width,
                                height=height, infotexts=texts, model_name=ckpt.model_name,
                                model_hash=ckpt.short_hash)
    job.result = {"images": [b64(p) for p in images] if r.send_images else [], "parameters": r.parameters,
                  "info": info}
    return state


def run_explain(job: Job, pipe) -> str:
    """"Where words land": minidiff.explain's per-word cross-attention overlays for the image a request describes."""
    import importlib
    explain = importlib.import_module("minidiff.explain")
    r = job.request
    maps = explain.attention_maps(pipe, r.prompt, seed=job.seed, steps=r.steps, guidance_scale=r.cfg_scale,
                                  scheduler=r.sampler, height=r.height, width=r.width,
                                  negative_prompt=r.negative_prompt or None)
    job.result = {"image": b64(png_bytes(maps.image)), "words": list(maps.words),
                  "overlays": {w: b64(png_bytes(maps.overlay(w))) for w in maps.words}}
    return "done"


def fix_seeds(job: Job) -> None:
    """AUTOMATIC1111's fix_seed, at submission: -1 becomes a random seed, known before the job runs."""
    job.seed = a1111.fixed_seed(job.request.seed)
    job.subseed = a1111.fixed_seed(job.request.subseed)

