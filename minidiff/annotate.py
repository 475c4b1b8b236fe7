"""Chapter 11.3 — `minidiff annotate DIR`: review and fix captions in a local web page.

Draft captions (from a Pokédex, from BLIP...) are only as good as the person who checks them. This serves one page
on 127.0.0.1 that shows each image of an imagefolder with its caption in an editable field:

    Enter            save, mark reviewed, go to the next image       Ctrl+S         save, stay
    Alt+←/→, PgUp/PgDn   previous / next (also while typing)         Esc, then ←/→  previous / next
    u                only un-reviewed images                         progress       reviewed / total, always shown

Every save is one POST that is written to metadata.jsonl at once by `update_caption` (temp file + fsync + rename):
the file is valid JSONL at every instant, and killing the server loses nothing that was saved.

HTTP API (JSON; the page uses nothing else):
    GET  /                   the page (minidiff/annotate_page.html)
    GET  /api/items          {"folder", "items": [{"file_name", "text", "reviewed", ...}], "reviewed", "total"}
    POST /api/caption        {"file_name", "text"[, "reviewed": true]} -> {"item", "reviewed", "total"}
    GET  /images/<name>      the image, only for a file_name listed in metadata.jsonl (no traversal: 403/404)
Errors: 400 malformed JSON or fields, 403 traversal or a foreign Host/Origin, 404 unknown file, 411 no length,
413 body over 64 KiB, 415 not application/json.

The server is stdlib only (http.server.ThreadingHTTPServer in a thread); bound to 127.0.0.1 unless told otherwise.
    server = serve("my_set")        # port 0: a free port; server.url -> "http://127.0.0.1:PORT/"
    server.close()
"""
from __future__ import annotations

import json
import logging
import mimetypes
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from urllib.parse import unquote, urlsplit

from .data.imagefolder import METADATA, read_metadata, resolve_in_folder, update_caption

MAX_BODY = 64 * 1024                    # a caption is a sentence; anything bigger is a mistake or an attack
LOOPBACK_NAMES = {"127.0.0.1", "localhost", "::1"}
log = logging.getLogger("minidiff.annotate")


def _page() -> bytes:
    return resources.files("minidiff").joinpath("annotate_page.html").read_bytes()


class AnnotateServer(ThreadingHTTPServer):
    """ThreadingHTTPServer that knows its folder; `url` to open, `close()` to stop and free the port."""

    daemon_threads = True

    def __init__(self, folder: str | Path, host: str = "127.0.0.1", port: int = 0):
        self.folder = Path(folder).resolve()
        if not (self.folder / METADATA).is_file():
            raise FileNotFoundError(f"{self.folder}: no {METADATA} — make one with `minidiff data` or by hand")
        read_metadata(self.folder)          # warns once, at start, about every line that will not be shown
        self.page = _page()
        self.thread: threading.Thread | None = None
        super().__init__((host, port), AnnotateHandler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{port}/"

    @property
    def loopback_only(self) -> bool:
        return self.server_address[0] in ("127.0.0.1", "::1") or self.server_address[0].startswith("127.")

    def listing(self) -> dict[str, dict]:
        """The usable rows of metadata.jsonl by file_name (read fresh: the file is the only state)."""
        return {row["file_name"]: row for row in read_metadata(self.folder, warn=False)}  # warned once at start

    def close(self) -> None:
        self.shutdown()
        self.server_close()
        if self.thread is not None:
            self.thread.join(timeout=5)


class AnnotateHandler(BaseHTTPRequestHandler):
    server: AnnotateServer
    server_version = "minidiff-annotate"

    # ------------------------------------------------------------------ plumbing
    def log_message(self, fmt, *args):                       # quiet terminal; `logging` has it at DEBUG
        log.debug("%s - %s", self.address_string(), fmt % args)

    def _send(self, status: int, body: bytes, content_type: str, extra: dict | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Cache-Control", "no-store")
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, obj) -> None:
        self._send(status, json.dumps(obj, ensure_ascii=False).encode("utf-8"), "application/json; charset=utf-8")

    def _error(self, status: HTTPStatus, message: str) -> None:
        self._json(status, {"error": message})

    def _host_ok(self) -> bool:
        """Refuse a foreign Host (DNS rebinding) and a foreign Origin (another site POSTing) on a loopback server."""
        if not self.server.loopback_only:
            return True
        host = self.headers.get("Host", "")
        name = urlsplit("//" + host).hostname or ""
        if name not in LOOPBACK_NAMES and not name.startswith("127."):
            return False
        origin = self.headers.get("Origin")
        if origin is not None and origin != "null":
            oname = urlsplit(origin).hostname or ""
            if oname not in LOOPBACK_NAMES and not oname.startswith("127."):
                return False
        return True

    # ------------------------------------------------------------------ GET
    def do_GET(self):
        if not self._host_ok():
            return self._error(HTTPStatus.FORBIDDEN, "foreign Host or Origin")
        path = urlsplit(self.path).path
        if path in ("/", "/index.html"):
            csp = ("default-src 'self'; img-src 'self'; style-src 'self' 'unsafe-inline'; "
                   "script-src 'self' 'unsafe-inline'; connect-src 'self'; frame-ancestors 'none'")
            return self._send(HTTPStatus.OK, self.server.page, "text/html; charset=utf-8",
                              {"Content-Security-Policy": csp})
        if path == "/api/items":
            return self._items()
        if path.startswith("/images/"):
            return self._image(path[len("/images/"):])
        return self._error(HTTPStatus.NOT_FOUND, "no such page")

    do_HEAD = do_GET

    def _items(self):
        items = list(self.server.listing().values())
        self._json(HTTPStatus.OK, {"folder": self.server.folder.name, "items": items, "total": len(items),
                                   "reviewed": sum(1 for r in items if r.get("reviewed") is True)})

    def _image(self, raw: str):
        try:
            name = unquote(raw, errors="strict")
        except UnicodeDecodeError:
            return self._error(HTTPStatus.BAD_REQUEST, "bad percent-encoding")
        # Traversal (../, absolute, %2e%2e%2f, a symlink out of the folder) is refused before any lookup.
        path = resolve_in_folder(self.server.folder, name)
        if path is None:
            return self._error(HTTPStatus.FORBIDDEN, "path outside the folder")
        if name not in self.server.listing():                 # only files listed in metadata.jsonl are served
            return self._error(HTTPStatus.NOT_FOUND, f"{name!r} is not listed in {METADATA}")
        try:
            body = path.read_bytes()
        except OSError:
            return self._error(HTTPStatus.NOT_FOUND, f"{name!r} cannot be read")
        ctype = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        if not ctype.startswith("image/") or ctype == "image/svg+xml":  # svg can carry script: send as bytes
            ctype = "application/octet-stream"
        self._send(HTTPStatus.OK, body, ctype)

    # ------------------------------------------------------------------ POST
    def do_POST(self):
        if not self._host_ok():
            return self._refuse(HTTPStatus.FORBIDDEN, "foreign Host or Origin")
        if urlsplit(self.path).path != "/api/caption":
            return self._refuse(HTTPStatus.NOT_FOUND, "no such endpoint")
        length = self.headers.get("Content-Length")
        if length is None:
            return self._refuse(HTTPStatus.LENGTH_REQUIRED, "Content-Length required")
        try:
            length = int(length)
            if length < 0:
                raise ValueError
        except ValueError:
            return self._refuse(HTTPStatus.BAD_REQUEST, "bad Content-Length")
        if length > MAX_BODY:
            return self._refuse(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"body over {MAX_BODY} bytes")
        ctype = self.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if ctype != "application/json":
            return self._refuse(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "Content-Type must be application/json")
        raw = self.rfile.read(length)
        try:
            body = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            return self._error(HTTPStatus.BAD_REQUEST, f"malformed JSON: {e}")
        if not isinstance(body, dict):
            return self._error(HTTPStatus.BAD_REQUEST, "expected a JSON object")
        name, text, reviewed = body.get("file_name"), body.get("text"), body.get("reviewed", True)
        if not isinstance(name, str) or not isinstance(text, str) or not isinstance(reviewed, bool):
            return self._error(HTTPStatus.BAD_REQUEST, "needs a string file_name, a string text, optional bool reviewed")
        if name not in self.server.listing():
            return self._error(HTTPStatus.NOT_FOUND, f"{name!r} is not listed in {METADATA}")
        try:
            row = update_caption(self.server.folder, name, text, reviewed=reviewed)
        except KeyError:                                     # removed from the file between the two reads
            return self._error(HTTPStatus.NOT_FOUND, f"{name!r} is not listed in {METADATA}")
        except OSError as e:
            return self._error(HTTPStatus.INTERNAL_SERVER_ERROR, f"could not write {METADATA}: {e}")
        rows = self.server.listing()
        self._json(HTTPStatus.OK, {"item": row, "total": len(rows),
                                   "reviewed": sum(1 for r in rows.values() if r.get("reviewed") is True)})

    def _refuse(self, status: HTTPStatus, message: str) -> None:
        """An error sent before the body was read: the connection is closed so the unread body is never parsed."""
        self.close_connection = True
        self._send(status, json.dumps({"error": message}).encode(), "application/json", {"Connection": "close"})

    def do_PUT(self):
        self._refuse(HTTPStatus.METHOD_NOT_ALLOWED, "use GET or POST")

    do_DELETE = do_PATCH = do_PUT


def serve(folder: str | Path, host: str = "127.0.0.1", port: int = 0) -> AnnotateServer:
    """Start the annotation server for `folder` in a daemon thread; returns it (`.url`, `.close()`)."""
    server = AnnotateServer(folder, host, port)
    server.thread = threading.Thread(target=server.serve_forever, name="minidiff-annotate", daemon=True)
    server.thread.start()
    return server
