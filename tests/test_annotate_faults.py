"""`minidiff annotate` under faults: the server killed with SIGKILL in the middle of a burst of 20 concurrent saves
leaves a valid, complete metadata.jsonl (every line JSON, every image still listed, each caption the old one or one
that was sent — and never older than the last save the server acknowledged); no endpoint reads or writes outside its
folder (.., %2e%2e, absolute paths, symlinked files and folders, a symlinked metadata.jsonl); it binds to 127.0.0.1
unless told otherwise. The server runs as a real subprocess, as users run it; every wait is bounded."""
import http.client
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from PIL import Image

from minidiff.commands import annotate as annotate_command
from minidiff.annotate import serve

ROOT = Path(__file__).resolve().parent.parent
N = 20          # images, one writer thread each
ROUNDS = 15     # captions each writer sends, one after the other


def make_folder(d: Path, n: int = N) -> list[str]:
    d.mkdir(parents=True)
    names = [f"img{i:02d}.png" for i in range(n)]
    for i, name in enumerate(names):
        Image.new("RGB", (4, 4), (i, 0, 0)).save(d / name)
    (d / "metadata.jsonl").write_text("".join(json.dumps({"file_name": n, "text": f"old {n}"}) + "\n" for n in names))
    return names


def start_server(folder: Path):
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-m", "minidiff", "annotate", str(folder), "--no-browser"],
                            preexec_fn=sigint_as_in_a_terminal,
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    m = re.search(r"at http://127\.0\.0\.1:(\d+)/", line)
    if not m:
        proc.kill()
        raise AssertionError(f"server did not start: {line!r} {proc.stderr.read()}")
    return proc, int(m.group(1))


def post(port: int, name: str, text: str) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("POST", "/api/caption", body=json.dumps({"file_name": name, "text": text}),
                     headers={"Content-Type": "application/json"})
        return conn.getresponse().status
    finally:
        conn.close()


def caption(name: str, r: int) -> str:
    return f"new {name} #{r} " + "é" * r  # non-ASCII, growing: a torn write would show


@pytest.mark.parametrize("kill_after", [1, 40, 150])
def test_sigkill_during_a_burst_of_saves_keeps_metadata_valid(tmp_path, kill_after):
    folder = tmp_path / "set"
    names = make_folder(folder)
    proc, port = start_server(folder)
    acked = {n: -1 for n in names}          # the last round the server answered 200 for, per image
    count, lock, killed = [0], threading.Lock(), threading.Event()

    def writer(name):
        for r in range(ROUNDS):
            try:
                status = post(port, name, caption(name, r))
            except OSError:                  # the server is gone: refused / reset / closed mid-response
                return
            if status == 200:
                acked[name] = r
                with lock:
                    count[0] += 1
                    if count[0] == kill_after and not killed.is_set():
                        killed.set()
                        os.kill(proc.pid, signal.SIGKILL)   # in the middle of the burst: other saves are in flight
            if killed.is_set():
                return

    threads = [threading.Thread(target=writer, args=(n,)) for n in names]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=20)
        proc.stdout.close()
        proc.stderr.close()
    assert killed.is_set() and proc.returncode == -signal.SIGKILL
    assert not any(t.is_alive() for t in threads)

    lines = (folder / "metadata.jsonl").read_text(encoding="utf-8").splitlines()
    rows = [json.loads(line) for line in lines]                     # every line is valid JSON
    assert [r["file_name"] for r in rows] == names                  # complete: every image, in order, once
    for row in rows:
        name, text = row["file_name"], row["text"]
        sent = [caption(name, r) for r in range(ROUNDS)]
        assert text == f"old {name}" or text in sent, text          # old or new, never torn
        got = -1 if text == f"old {name}" else sent.index(text)
        assert got >= acked[name], (name, got, acked[name])         # an acknowledged save is never lost
    leftovers = [p.name for p in folder.iterdir() if p.suffix != ".png" and p.name != "metadata.jsonl"]
    assert all(re.fullmatch(r"\.metadata\.jsonl\..+\.tmp", n) for n in leftovers), leftovers  # only unrenamed temps

    if kill_after != 40:
        return
    proc, port = start_server(folder)                               # and the folder works again at once
    try:
        assert post(port, names[0], "after the crash") == 200
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=20)
    assert json.loads((folder / "metadata.jsonl").read_text(encoding="utf-8").splitlines()[0])["text"] == \
        "after the crash"


# ---------------------------------------------------------------------------------------------- the folder's walls
@pytest.fixture
def walled(tmp_path):
    """A folder whose metadata.jsonl lists names that point outside it, next to files that must stay untouched."""
    outside = tmp_path / "outside"
    outside.mkdir()
    Image.new("RGB", (4, 4), (255, 0, 0)).save(outside / "secret.png")
    (outside / "secret.txt").write_text("TOP SECRET")
    d = tmp_path / "set"
    make_folder(d, 2)
    os.symlink(outside / "secret.png", d / "link.png")             # a symlinked file pointing out
    os.symlink(outside, d / "linkdir")                              # a symlinked folder pointing out
    hostile = ["../outside/secret.png", str(outside / "secret.png"), "link.png", "linkdir/secret.png",
               "%2e%2e/outside/secret.png", "..\\outside\\secret.png", "./../outside/secret.png"]
    with open(d / "metadata.jsonl", "a", encoding="utf-8") as f:
        for name in hostile:
            f.write(json.dumps({"file_name": name, "text": "hostile"}) + "\n")
    return d, outside, hostile


def snapshot(root: Path, skip: Path) -> dict:
    """Every file under root but outside `skip`: path -> (bytes, mtime)."""
    out = {}
    for p in root.rglob("*"):
        if p.is_file() and not p.is_symlink() and skip not in p.parents:
            out[p] = (p.read_bytes(), p.stat().st_mtime_ns)
    return out


def request(port, method, path, body=None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        headers = {"Content-Type": "application/json"} if body is not None else {}
        conn.request(method, path, body=None if body is None else json.dumps(body), headers=headers)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def test_no_endpoint_reads_or_writes_outside_the_folder(walled, tmp_path):
    folder, outside, hostile = walled
    before = snapshot(tmp_path, folder)
    with pytest.warns(UserWarning) as warned:                       # each hostile row is skipped, with a warning
        srv = serve(folder)
    assert sum("outside the folder" in str(w.message) for w in warned) == 6  # the 7th: '%2e%2e/...' is a plain name
    try:
        port = srv.server_address[1]
        items = json.loads(request(port, "GET", "/api/items")[1])["items"]
        assert [it["file_name"] for it in items] == ["img00.png", "img01.png"]  # hostile rows are never listed
        quoted = ["..%2Foutside%2Fsecret.png", "%2e%2e%2foutside%2fsecret.png", "%2E%2E/outside/secret.png",
                  "../outside/secret.png", "%2Ftmp%2Fsecret.png", "/" + str(outside / "secret.png"),
                  "link.png", "linkdir/secret.png", "linkdir%2Fsecret.png", "sub/../../outside/secret.png",
                  "%252e%252e%252foutside%252fsecret.png", "..%5Coutside%5Csecret.png", "%2e%2e%2fsecret.txt"]
        for q in quoted:
            status, body = request(port, "GET", "/images/" + q)
            assert status in (403, 404), q
            assert b"TOP SECRET" not in body and b"PNG" not in body, q
        for name in hostile + ["../outside/secret.txt", "/etc/passwd", "linkdir/new.png"]:
            status, body = request(port, "POST", "/api/caption", {"file_name": name, "text": "pwned"})
            assert status in (403, 404), name
        assert request(port, "POST", "/api/caption", {"file_name": "img00.png", "text": "fine"})[0] == 200
    finally:
        srv.close()
    assert snapshot(tmp_path, folder) == before                      # nothing outside the folder changed
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    assert [r["text"] for r in rows] == ["fine", "old img01.png"] + ["hostile"] * len(hostile)
    assert sorted(p.name for p in folder.iterdir()) == ["img00.png", "img01.png", "link.png", "linkdir",
                                                         "metadata.jsonl"]   # no file created in the folder either


def test_a_symlinked_metadata_file_is_replaced_not_written_through(tmp_path):
    """metadata.jsonl that is a symlink to a file elsewhere: a save writes a new file in the folder; the target
    outside keeps its bytes (os.replace swaps the link, it never opens the target for writing)."""
    outside = tmp_path / "elsewhere.jsonl"
    d = tmp_path / "set"
    d.mkdir()
    Image.new("RGB", (4, 4)).save(d / "a.png")
    outside.write_text(json.dumps({"file_name": "a.png", "text": "old"}) + "\n")
    original = outside.read_bytes()
    os.symlink(outside, d / "metadata.jsonl")
    srv = serve(d)
    try:
        assert request(srv.server_address[1], "POST", "/api/caption", {"file_name": "a.png", "text": "new"})[0] == 200
    finally:
        srv.close()
    assert outside.read_bytes() == original
    assert not (d / "metadata.jsonl").is_symlink()
    assert json.loads((d / "metadata.jsonl").read_text())["text"] == "new"


# ---------------------------------------------------------------------------------------------- where it listens
def test_binds_to_loopback_unless_told(tmp_path):
    folder = tmp_path / "set"
    make_folder(folder, 1)
    parser = __import__("argparse").ArgumentParser()
    annotate_command.add_arguments(parser)
    assert parser.parse_args([str(folder)]).host == "127.0.0.1"     # the CLI's default
    srv = serve(folder)                                              # the library's default
    try:
        assert srv.server_address[0] == "127.0.0.1" and srv.loopback_only
    finally:
        srv.close()
    srv = serve(folder, host="127.0.0.2")                            # told otherwise: it listens there
    try:
        assert srv.server_address[0] == "127.0.0.2"
        status, _ = request_at("127.0.0.2", srv.server_address[1], "/api/items")
        assert status == 200
    finally:
        srv.close()


def request_at(host, port, path):
    conn = http.client.HTTPConnection(host, port, timeout=10)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def test_cli_listens_on_loopback_only(tmp_path):
    """The running CLI's socket, seen from outside the process: bound to 127.0.0.1, not 0.0.0.0 / ::."""
    folder = tmp_path / "set"
    make_folder(folder, 1)
    proc, port = start_server(folder)
    try:
        deadline = time.monotonic() + 10
        listening = None
        while listening is None and time.monotonic() < deadline:
            for table in ("/proc/net/tcp", "/proc/net/tcp6"):
                if not os.path.exists(table):
                    continue
                for line in Path(table).read_text().splitlines()[1:]:
                    local, state = line.split()[1], line.split()[3]
                    if state == "0A" and int(local.split(":")[1], 16) == port:  # 0A = LISTEN
                        listening = local.split(":")[0]
            if listening is None:
                time.sleep(0.1)
        if listening is None:
            pytest.skip("no /proc/net/tcp on this system")
        assert listening == "0100007F"                               # 127.0.0.1, little-endian hex
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=20)


def sigint_as_in_a_terminal():
    """Popen's preexec_fn: Ctrl+C (SIGINT) delivered as in a terminal, even when this test run was started in the
    background, where the shell makes every child ignore SIGINT (and Python then never raises KeyboardInterrupt)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
