"""`minidiff serve`: the web page and AUTOMATIC1111's /sdapi/v1 API on 127.0.0.1:7860 (minidiff.serve)."""
from __future__ import annotations

import argparse
import importlib.util

from ..errors import SetupError
from ..settings import Device, Existing, File, Host, Port, check_on_this_machine
from . import check_flags, load_model

EXTRA = "pip install 'minidiff[serve]'   (starlette and uvicorn)"
FLAGS_FIELDS = {"host": Host(), "port": Port(), "device": Device()}
MODEL = {"model": Existing(what="a diffusers folder or a CompVis .ckpt/.safetensors file")}
EMBEDDING = {"embedding": File(what="an embedding file (.safetensors, .pt, .bin)")}


def add_arguments(p) -> None:
    p.add_argument("--model", action="append", default=None, metavar="PATH",
                   help="a diffusers folder or CompVis .ckpt/.safetensors; repeat to offer several (the first is "
                        "loaded; sd_model_checkpoint switches among them). Default: the embedded model")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860, AUTOMATIC1111's)")
    p.add_argument("--listen", action="store_true",
                   help="bind 0.0.0.0: reachable from the network (as AUTOMATIC1111's --listen); use --api-auth")
    p.add_argument("--api-auth", default=None, metavar="USER:PASS",
                   help="require HTTP basic auth on every route (USER:PASS, several separated by commas)")
    p.add_argument("--embedding", action="append", default=[], metavar="PATH",
                   help="a textual-inversion embedding to load into every model (repeatable)")
    p.add_argument("--device", default="cpu")


def run(args) -> int:
    missing = [m for m in ("starlette", "uvicorn") if importlib.util.find_spec(m) is None]
    if missing:
        raise SetupError(f"{' and '.join(missing)} not installed; install the serve extra: {EXTRA}")
    check_flags(args, FLAGS_FIELDS)
    for path in args.model or []:                       # repeatable flags: each path by the same row
        check_on_this_machine(argparse.Namespace(model=path), MODEL)
    for path in args.embedding:
        check_on_this_machine(argparse.Namespace(embedding=path), EMBEDDING)
    import uvicorn

    from ..serve.app import create_app

    host = "0.0.0.0" if args.listen else args.host
    loopback = host in ("127.0.0.1", "localhost", "::1") or host.startswith("127.")
    # a --model that is not a model, an --embedding that is not one, a bad --api-auth: minidiff's own errors, which
    # minidiff/cli.py prints as one line
    app = create_app(models=args.model or [None], embeddings=args.embedding, device=args.device,
                     auth=args.api_auth, loopback_only=loopback, loader=load_model)
    shown = "127.0.0.1" if host == "0.0.0.0" else host
    print(f"minidiff serve: http://{shown}:{args.port}/  (API: /sdapi/v1/..., "
          f"{'auth on' if args.api_auth else 'no auth'}) — Ctrl+C to stop", flush=True)
    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):   # Ctrl+C: interrupt the running job at once, so that its request is
            app.state.server.queue.shutdown()  # answered with what it made and the shutdown need not wait for it
            super().handle_exit(sig, frame)

    try:      # uvicorn shuts down gracefully, then re-raises the Ctrl+C
        Server(uvicorn.Config(app, host=host, port=args.port, log_level="warning", timeout_graceful_shutdown=10)).run()
    except KeyboardInterrupt:
        pass
    print("minidiff serve: stopped", flush=True)
    return 0
