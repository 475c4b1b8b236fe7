"""`minidiff annotate DIR`: review and edit an imagefolder's captions in a local web page (minidiff.annotate)."""
from __future__ import annotations

import time
import webbrowser

from ..annotate import serve
from ..data.imagefolder import METADATA
from ..settings import Folder, Host, Port
from . import check_flags, listening

FLAGS_FIELDS = {"dir": Folder(holding=METADATA, flag="DIR"), "host": Host(), "port": Port()}


def add_arguments(parser) -> None:
    parser.add_argument("dir", metavar="DIR", help="an imagefolder (images + metadata.jsonl)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=0, help="port (default 0: any free port)")
    parser.add_argument("--no-browser", action="store_true", help="do not open a browser, just print the address")


def run(args) -> int:
    check_flags(args, FLAGS_FIELDS)
    with listening(args.host, args.port):
        server = serve(args.dir, args.host, args.port)
    rows = server.listing()
    done = sum(1 for r in rows.values() if r.get("reviewed") is True)
    print(f"annotating {server.folder} ({done} / {len(rows)} reviewed) at {server.url}  — Ctrl+C to stop", flush=True)
    try:                                   # Ctrl+C may come while the browser is still being started
        if not args.no_browser:
            webbrowser.open(server.url)
        while server.thread.is_alive():
            time.sleep(0.5)
    except KeyboardInterrupt:
        print("\nstopped; every saved caption is in", server.folder / METADATA)
    finally:
        server.close()
    return 0
