"""`minidiff annotate`: the HTTP API at the socket level — save and reload, only listed images served, traversal,
oversize, malformed and foreign requests refused, concurrent saves keep metadata.jsonl valid with no lost update,
and the CLI end to end in a subprocess (Ctrl+C stops it cleanly). Loopback only; every loop is bounded."""
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
from PIL import Image

from minidiff import cli
from minidiff.annotate import MAX_BODY, serve

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAMES = ["a.png", "b.png", "sub/c.png", "déjà vu.png"]


@pytest.fixture
def folder(tmp_path):
    d = tmp_path / "set"
    (d / "sub").mkdir(parents=True)
    for i, n in enumerate(NAMES):
        Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(d / n)
    Image.new("RGB", (8, 8)).save(d / "unlisted.png")
    (tmp_path / "secret.txt").write_text("TOP SECRET")
    os.symlink(tmp_path / "secret.txt", d / "link.png")
    lines = [json.dumps({"file_name": n, "text": f"caption {i}", "reviewed": i == 0}, ensure_ascii=False)
             for i, n in enumerate(NAMES)]
    lines.insert(2, "a line that is not json")
    lines.append(json.dumps({"file_name": "link.png", "text": "a symlink out of the folder"}))
    (d / "metadata.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return d


@pytest.fixture
def server(folder):
    with pytest.warns(UserWarning):          # the bad line and the symlink are skipped with a warning
        srv = serve(folder)
    try:
        yield srv
    finally:
        srv.close()


def request(server, method, path, body=None, headers=None):
    host, port = server.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=10)
    try:
        hdrs = {"Content-Type": "application/json"} if body is not None else {}
        hdrs.update(headers or {})
        if isinstance(body, (dict, list)):
            body = json.dumps(body).encode()
        conn.request(method, path, body=body, headers=hdrs)
        resp = conn.getresponse()
        data = resp.read()
        return resp.status, resp.getheader("Content-Type", ""), data
    finally:
        conn.close()


def get_json(server, path):
    status, _, data = request(server, "GET", path)
    assert status == 200
    return json.loads(data)


def test_page_and_items(server, folder):
    status, ctype, page = request(server, "GET", "/")
    assert status == 200 and ctype.startswith("text/html") and b"minidiff annotate" in page
    d = get_json(server, "/api/items")
    assert d["folder"] == "set" and d["total"] == 4 and d["reviewed"] == 1
    assert [it["file_name"] for it in d["items"]] == NAMES
    assert d["items"][3] == {"file_name": "déjà vu.png", "text": "caption 3", "reviewed": False}
    assert server.server_address[0] == "127.0.0.1"        # this machine only, by default


def test_save_is_written_at_once_and_reloads(server, folder):
    before = (folder / "metadata.jsonl").read_text(encoding="utf-8").splitlines()
    status, _, data = request(server, "POST", "/api/caption", {"file_name": "sub/c.png", "text": "a red ✓ square"})
    assert status == 200
    d = json.loads(data)
    assert d["item"] == {"file_name": "sub/c.png", "text": "a red ✓ square", "reviewed": True}
    assert d["reviewed"] == 2 and d["total"] == 4
    after = (folder / "metadata.jsonl").read_text(encoding="utf-8").splitlines()
    assert json.loads(after[3]) == d["item"]
    assert [l for i, l in enumerate(after) if i != 3] == [l for i, l in enumerate(before) if i != 3]  # untouched
    assert get_json(server, "/api/items")["items"][2]["text"] == "a red ✓ square"                   # reload
    status, _, data = request(server, "POST", "/api/caption", {"file_name": "a.png", "text": "x", "reviewed": False})
    assert status == 200 and json.loads(data)["reviewed"] == 1


def test_only_listed_images_are_served(server, folder):
    status, ctype, data = request(server, "GET", "/images/a.png")
    assert status == 200 and ctype == "image/png" and data == (folder / "a.png").read_bytes()
    status, _, data = request(server, "GET", "/images/sub%2Fc.png")
    assert status == 200 and data == (folder / "sub" / "c.png").read_bytes()
    status, _, data = request(server, "GET", "/images/d%C3%A9j%C3%A0%20vu.png")
    assert status == 200 and data == (folder / "déjà vu.png").read_bytes()
    assert request(server, "HEAD", "/images/a.png")[0] == 200
    for path in ("/images/unlisted.png", "/images/metadata.jsonl", "/images/nope.png", "/images/%252e%252e%252fsecret.txt"):
        assert request(server, "GET", path)[0] == 404, path
    for path in ("/images/../secret.txt", "/images/..%2Fsecret.txt", "/images/%2e%2e%2fsecret.txt",
                 "/images/%2E%2E/%2E%2E/etc/passwd", "/images/sub/../../secret.txt", "/images/%2Fetc%2Fpasswd",
                 "/images//etc/passwd", "/images/..%5Csecret.txt", "/images/link.png", "/images/a.png%00.txt",
                 "/images/"):
        status, _, data = request(server, "GET", path)
        assert status in (403, 404), path
        assert b"TOP SECRET" not in data and b"root:" not in data
    assert request(server, "GET", "/images/%ff%fe")[0] == 400
    assert request(server, "GET", "/etc/passwd")[0] == 404


def test_bad_requests_are_refused_and_change_nothing(server, folder):
    before = (folder / "metadata.jsonl").read_bytes()
    cases = [
        (b"{not json", 400), (b'["a.png", "x"]', 400), (b"\xff\xfe", 400),
        ({"file_name": "a.png"}, 400), ({"file_name": "a.png", "text": 5}, 400),
        ({"file_name": 3, "text": "x"}, 400), ({"file_name": "a.png", "text": "x", "reviewed": "yes"}, 400),
        ({"file_name": "zzz.png", "text": "x"}, 404), ({"file_name": "unlisted.png", "text": "x"}, 404),
        ({"file_name": "link.png", "text": "x"}, 404), ({"file_name": "../secret.txt", "text": "x"}, 404),
    ]
    for body, expected in cases:
        status, ctype, data = request(server, "POST", "/api/caption", body)
        assert status == expected, body
        assert ctype.startswith("application/json") and "error" in json.loads(data)
    assert request(server, "POST", "/api/caption", b'{"file_name": "a.png", "text": "x"}',
                   {"Content-Type": "text/plain"})[0] == 415
    assert request(server, "POST", "/api/nothing", {"file_name": "a.png", "text": "x"})[0] == 404
    assert request(server, "PUT", "/api/caption", {"file_name": "a.png", "text": "x"})[0] == 405
    assert (folder / "metadata.jsonl").read_bytes() == before


def test_oversize_body_is_413_and_not_read(server, folder):
    before = (folder / "metadata.jsonl").read_bytes()
    big = {"file_name": "a.png", "text": "x" * MAX_BODY}
    assert request(server, "POST", "/api/caption", big)[0] == 413
    # a client that announces a huge body but sends a few bytes: answered at once, nothing waits for the rest
    host, port = server.server_address[:2]
    with socket.create_connection((host, port), timeout=10) as s:
        s.sendall(b"POST /api/caption HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 1000000000\r\n\r\n{")
        assert s.recv(100).startswith(b"HTTP/1.0 413")
    with socket.create_connection((host, port), timeout=10) as s:     # no Content-Length at all
        s.sendall(b"POST /api/caption HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n\r\n")
        assert s.recv(100).startswith(b"HTTP/1.0 411")
    assert (folder / "metadata.jsonl").read_bytes() == before


def test_foreign_host_and_origin_are_refused(server, folder):
    ok = {"file_name": "a.png", "text": "ok"}
    assert request(server, "GET", "/api/items", headers={"Host": "evil.example:80"})[0] == 403       # DNS rebinding
    assert request(server, "POST", "/api/caption", ok, {"Origin": "http://evil.example"})[0] == 403  # CSRF
    host, port = server.server_address[:2]
    assert request(server, "POST", "/api/caption", ok, {"Origin": f"http://{host}:{port}"})[0] == 200
    assert request(server, "GET", "/api/items", headers={"Host": f"localhost:{port}"})[0] == 200


def test_concurrent_saves_keep_jsonl_valid_and_lose_nothing(tmp_path):
    d = tmp_path / "many"
    d.mkdir()
    names = [f"{i}.png" for i in range(6)]
    for n in names:
        Image.new("RGB", (4, 4)).save(d / n)
    (d / "metadata.jsonl").write_text("".join(json.dumps({"file_name": n, "text": "draft"}) + "\n" for n in names))
    srv = serve(d)
    errors, reads = [], [0]
    stop = threading.Event()

    def writer(k):
        for i in range(12):                                           # each thread owns one image
            status, _, _ = request(srv, "POST", "/api/caption", {"file_name": names[k], "text": f"t{k}-{i} " + "é" * i})
            if status != 200:
                errors.append(status)

    def reader():
        deadline = time.monotonic() + 30
        while not stop.is_set() and time.monotonic() < deadline:
            lines = (d / "metadata.jsonl").read_text(encoding="utf-8").splitlines()
            rows = [json.loads(l) for l in lines]                     # raises if a half-written file is ever seen
            assert [r["file_name"] for r in rows] == names
            reads[0] += 1

    try:
        threads = [threading.Thread(target=writer, args=(k,)) for k in range(len(names))]
        rt = threading.Thread(target=reader)
        rt.start()
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        stop.set()
        rt.join(timeout=60)
    finally:
        srv.close()
    assert not errors and reads[0] > 0
    rows = [json.loads(l) for l in (d / "metadata.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["text"] for r in rows] == [f"t{k}-11 " + "é" * 11 for k in range(len(names))]   # no lost update
    assert all(r["reviewed"] is True for r in rows)
    assert sorted(p.name for p in d.iterdir()) == sorted(names + ["metadata.jsonl"])            # no temp files left


def test_cli_errors_without_metadata(tmp_path, capsys):
    assert cli.main(["annotate", str(tmp_path), "--no-browser"]) == 2
    assert "metadata.jsonl" in capsys.readouterr().err


def test_cli_serves_until_ctrl_c(folder):
    # --no-browser: no window from a test; tests/test_cli.py runs the default (a browser opens, BROWSER=true)
    proc = subprocess.Popen([sys.executable, "-m", "minidiff", "annotate", str(folder), "--no-browser", "--port", "0"],
                            preexec_fn=sigint_as_in_a_terminal,
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()                                  # "annotating DIR (1 / 4 reviewed) at URL ..."
        m = re.search(r"\((\d+) / (\d+) reviewed\) at http://127\.0\.0\.1:(\d+)/", line)
        assert m, line + proc.stderr.read() if proc.poll() is not None else line
        assert m.group(1, 2) == ("1", "4")
        conn = http.client.HTTPConnection("127.0.0.1", int(m.group(3)), timeout=10)
        conn.request("POST", "/api/caption", body=json.dumps({"file_name": "b.png", "text": "saved via the CLI"}),
                     headers={"Content-Type": "application/json"})
        assert conn.getresponse().status == 200
        conn.close()
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=20)
        assert proc.returncode == 0 and "stopped" in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    rows = {json.loads(l)["file_name"]: json.loads(l) for l in (folder / "metadata.jsonl").read_text().splitlines()
            if l.startswith("{")}
    assert rows["b.png"]["text"] == "saved via the CLI"


def sigint_as_in_a_terminal():
    """Popen's preexec_fn: Ctrl+C (SIGINT) delivered as in a terminal, even when this test run was started in the
    background, where the shell makes every child ignore SIGINT (and Python then never raises KeyboardInterrupt)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
