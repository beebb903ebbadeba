"""`python -m minidb.fetch`: download, resume, verify, and fail with one clear sentence.

Every test starts its own HTTP server on 127.0.0.1 serving a few hundred KB of random bytes, with
Range support written out in the handler below, so nothing here touches the network.
"""

import errno
import hashlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from minidb.writes import DiskFull
from minidb.fetch import DEFAULT_MODEL, FetchError, fetch, how_to_get_weights, part_path

ROOT = Path(__file__).resolve().parent.parent
BODY = os.urandom(300_000)  # fixed for the session; a new random file each run
SHA = hashlib.sha256(BODY).hexdigest()


class Server:
    """Serves BODY at /model.safetensors and records the Range header of every request (None if absent).
    ignore_range: answer 200 with the whole body, as some servers do. drop_after: on the first request
    only, send that many bytes of the body and then close the connection. stall_after: on the first
    request only, send that many bytes and then hang until the test ends. fault: "html" (a login page with 200),
    "loop" (a redirect to itself), "badlength" (Content-Length: abc), "nolength" (no Content-Length on a 200),
    or a number: answer a Range request with a 206 whose bytes start there."""

    def __init__(self, ignore_range=False, drop_after=None, stall_after=None, fault=None):
        self.ignore_range, self.drop_after, self.stall_after, self.ranges = ignore_range, drop_after, stall_after, []
        self.fault = fault
        self.release = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                server.answer(self)

            def log_message(self, *args):  # keep the test output clean
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}/model.safetensors"
        threading.Thread(target=self.httpd.serve_forever, args=(0.01,), daemon=True).start()  # quick shutdown

    def answer(self, h):
        if h.path != "/model.safetensors":
            h.send_error(404)
            return
        asked = h.headers.get("Range")
        self.ranges.append(asked)
        if self.fault in ("html", "loop"):
            page = b"<html><body>Sign in to continue</body></html>"
            h.send_response(200 if self.fault == "html" else 302)
            h.send_header("Content-Type", "text/html")
            h.send_header("Location", h.path)
            h.send_header("Content-Length", str(len(page)))
            h.end_headers()
            h.wfile.write(page)
            return
        start = 0
        if asked and not self.ignore_range:
            start = int(re.fullmatch(r"bytes=(\d+)-", asked)[1])
            if start >= len(BODY):
                h.send_response(416)
                h.send_header("Content-Range", f"bytes */{len(BODY)}")
                h.send_header("Content-Length", "0")
                h.end_headers()
                return
            start = self.fault if isinstance(self.fault, int) else start
            h.send_response(206)
            h.send_header("Content-Range", f"bytes {start}-{len(BODY) - 1}/{len(BODY)}")
        else:
            h.send_response(200)
        data = BODY[start:]
        if self.fault != "nolength" or start:
            h.send_header("Content-Length", "abc" if self.fault == "badlength" else str(len(data)))
        h.end_headers()
        if self.drop_after is not None:
            data, self.drop_after = data[:self.drop_after], None
            h.close_connection = True
        if self.stall_after is not None:
            h.wfile.write(data[:self.stall_after])
            h.wfile.flush()
            data, self.stall_after = b"", None
            self.release.wait(timeout=30)
        h.wfile.write(data)


@pytest.fixture
def serve():
    servers = []

    def start(**kwargs):
        servers.append(Server(**kwargs))
        return servers[-1]
    yield start
    for s in servers:
        s.release.set()
        s.httpd.shutdown()
        s.httpd.server_close()


@pytest.fixture(autouse=True)
def no_proxy(monkeypatch):
    monkeypatch.setenv("no_proxy", "*")  # a proxy set in the environment must not see 127.0.0.1


def closed_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nobody listens there once the socket is closed


def test_full_download(serve, tmp_path):
    server, out = serve(), tmp_path / "w" / "model.safetensors"
    assert fetch(server.url, SHA, out, progress=False) == out
    assert out.read_bytes() == BODY
    assert not part_path(out).exists() and server.ranges == [None]


def test_resumes_after_a_dropped_connection(serve, tmp_path):
    server, out = serve(drop_after=100_000), tmp_path / "model.safetensors"
    with pytest.raises(FetchError, match="stopped at byte 100000 of 300000.*run the same command again"):
        fetch(server.url, SHA, out, progress=False)
    assert part_path(out).read_bytes() == BODY[:100_000] and not out.exists()

    fetch(server.url, SHA, out, progress=False)
    assert server.ranges == [None, "bytes=100000-"]
    assert out.read_bytes() == BODY and not part_path(out).exists()


def test_resumes_a_partial_file(serve, tmp_path):
    server, out = serve(), tmp_path / "model.safetensors"
    part_path(out).write_bytes(BODY[:123_456])
    fetch(server.url, SHA, out, progress=False)
    assert server.ranges == ["bytes=123456-"] and out.read_bytes() == BODY


def test_complete_part_file_answered_416(serve, tmp_path):
    server, out = serve(), tmp_path / "model.safetensors"
    part_path(out).write_bytes(BODY)
    fetch(server.url, SHA, out, progress=False)
    assert server.ranges == [f"bytes={len(BODY)}-"] and out.read_bytes() == BODY


def test_server_that_ignores_range_starts_over(serve, tmp_path):
    server, out = serve(ignore_range=True), tmp_path / "model.safetensors"
    part_path(out).write_bytes(b"x" * 50_000)  # not a prefix of BODY: appending to it would fail the checksum
    fetch(server.url, SHA, out, progress=False)
    assert server.ranges == ["bytes=50000-"] and out.read_bytes() == BODY


def test_checksum_mismatch_deletes_the_download(serve, tmp_path):
    server, out = serve(), tmp_path / "model.safetensors"
    wrong = hashlib.sha256(b"another file").hexdigest()
    with pytest.raises(FetchError, match=f"has sha256 {SHA}, not {wrong}, so it was deleted"):
        fetch(server.url, wrong, out, progress=False)
    assert not part_path(out).exists() and not out.exists()


def test_a_content_length_that_is_no_number_is_read_as_unknown(serve, tmp_path):
    server, out = serve(fault="badlength"), tmp_path / "model.safetensors"  # it was a ValueError traceback
    fetch(server.url, SHA, out, progress=False)
    assert out.read_bytes() == BODY


def test_a_body_cut_short_without_a_length_is_kept_for_resuming(serve, tmp_path):
    server, out = serve(fault="nolength", drop_after=100_000), tmp_path / "model.safetensors"
    with pytest.raises(FetchError, match=r"ended at byte 100,000 without the server saying how long the file is"
                                         r".*is kept, so run the same command again to resume"):
        fetch(server.url, SHA, out, progress=False)  # it deleted the 100,000 good bytes and blamed --sha256
    assert part_path(out).read_bytes() == BODY[:100_000]
    fetch(server.url, SHA, out, progress=False)
    assert server.ranges == [None, "bytes=100000-"] and out.read_bytes() == BODY


def test_an_html_page_is_named_as_one_and_the_part_file_kept(serve, tmp_path):
    server, out = serve(fault="html"), tmp_path / "model.safetensors"
    part_path(out).write_bytes(BODY[:1000])
    with pytest.raises(FetchError, match=r"^The server sent an HTML page \(45 bytes\) instead of the file"):
        fetch(server.url, SHA, out, progress=False)  # it said the sha256 differed and deleted the .part
    assert part_path(out).read_bytes() == BODY[:1000]


def test_a_206_that_starts_at_another_byte(serve, tmp_path):
    """A 206 from byte 0 is the whole file: start again with it; from any other byte: keep the .part and say so.
    (It appended either to the good prefix, failed the checksum and deleted the prefix.)"""
    server, out = serve(fault=0), tmp_path / "model.safetensors"
    part_path(out).write_bytes(BODY[:200_000])
    fetch(server.url, SHA, out, progress=False)
    assert out.read_bytes() == BODY and server.ranges == ["bytes=200000-"]
    server, out = serve(fault=5), tmp_path / "other.safetensors"
    part_path(out).write_bytes(BODY[:200_000])
    with pytest.raises(FetchError, match="the bytes from 200,000 on with the bytes from 5 on; .* is kept"):
        fetch(server.url, SHA, out, progress=False)
    assert part_path(out).read_bytes() == BODY[:200_000]


def test_a_redirect_loop_is_one_sentence(serve, tmp_path):
    server, out = serve(fault="loop"), tmp_path / "model.safetensors"
    with pytest.raises(FetchError) as e:
        fetch(server.url, SHA, out, progress=False)
    assert "the server redirected in a loop or too many times (HTTP 302); open that address in a browser" in str(e.value)
    assert "\n" not in str(e.value) and not part_path(out).exists()


def test_a_full_disk_is_named_as_one(serve, tmp_path, monkeypatch):
    """Checked before the download where the length is known, and said as a disk problem when a write fails
    (it was "The download stopped at byte 0 ...; run again to resume")."""
    from minidb import fetch as f
    from minidb import writes
    server, out = serve(), tmp_path / "model.safetensors"
    free = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(writes.shutil, "disk_usage", lambda path: free._replace(free=1000))
    with pytest.raises(FetchError, match=r"^The disk holding .* has 1 kB free, but the rest of model.safetensors "
                                         r"needs about 300 kB; free some space or choose another --out.$"):
        fetch(server.url, SHA, out, progress=False)
    assert not part_path(out).exists()

    monkeypatch.setattr(writes.shutil, "disk_usage", lambda path: free)

    class Full:  # a file on a disk that fills up at the first write
        def __init__(self, *args):
            self.file = open(*args)

        def __getattr__(self, name):
            return getattr(self.file, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.file.close()

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(f, "open", Full, raising=False)
    with pytest.raises(DiskFull, match=r"^The disk holding .* is full: the rest of model.safetensors needs about "
                                       r"300 kB .*; free some space, then run the same command again to resume.$"):
        fetch(server.url, SHA, out, progress=False)


@pytest.mark.skipif(os.name != "posix", reason="flock")
def test_a_second_fetch_to_the_same_out_stops_at_once(serve, tmp_path):
    import fcntl
    server, out = serve(), tmp_path / "model.safetensors"
    part_path(out).write_bytes(BODY[:1000])
    with open(part_path(out), "ab") as other:  # what a first fetch holds while it downloads
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(FetchError, match=r"^Another fetch is downloading to .*model.safetensors.part; wait"):
            fetch(server.url, SHA, out, progress=False)  # it resumed the first's growing .part
    assert server.ranges == [] and part_path(out).read_bytes() == BODY[:1000]


def test_cli_refuses_an_empty_out(serve, tmp_path, monkeypatch, capsys):
    from minidb import fetch as f
    monkeypatch.setattr(f, "WEIGHTS", tmp_path)
    with pytest.raises(SystemExit) as e:
        f.main(["--url", serve().url, "--sha256", SHA, "--out", ""])  # it saved into weights/
    assert e.value.code == 2 and "argument --out: must not be empty; give a path" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_unreachable_server_says_how_to_get_the_file_by_hand(tmp_path):
    url, out = f"http://127.0.0.1:{closed_port()}/model.safetensors", tmp_path / "model.safetensors"
    with pytest.raises(FetchError) as e:
        fetch(url, SHA, out, progress=False)
    message = str(e.value)
    assert "could not be reached" in message and "open that address in a browser" in message
    assert url in message and f"save the file as {out}." in message


def test_http_error_says_how_to_get_the_file_by_hand(serve, tmp_path):
    url, out = serve().url.replace("model", "missing"), tmp_path / "model.safetensors"
    with pytest.raises(FetchError, match=r"HTTP 404 .*save the file as"):
        fetch(url, SHA, out, progress=False)
    assert not out.exists()


def test_present_file_with_right_checksum_makes_no_request(serve, tmp_path, capsys):
    server, out = serve(), tmp_path / "model.safetensors"
    out.write_bytes(BODY)
    fetch(server.url, SHA, out, progress=False)
    assert server.ranges == [] and "already there" in capsys.readouterr().out


def test_present_file_with_wrong_checksum_is_left_alone(serve, tmp_path):
    server, out = serve(), tmp_path / "model.safetensors"
    out.write_bytes(b"someone else's file")
    with pytest.raises(FetchError, match="already exists but its sha256 is"):
        fetch(server.url, SHA, out, progress=False)
    assert server.ranges == [] and out.read_bytes() == b"someone else's file"


def test_advice_when_the_default_model_is_missing():
    advice = how_to_get_weights()
    assert f"There is no model at {DEFAULT_MODEL}; run `python -m minidb.fetch` to download" in advice
    assert "pass --model a diffusers folder" in advice and "\n" not in advice
    assert "`python -m minidb.fetch --out x.safetensors`" in how_to_get_weights("x.safetensors")


def run(*args):
    env = {**os.environ, "no_proxy": "*"}
    return subprocess.run([sys.executable, "-m", "minidb.fetch", *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)


def test_cli(serve, tmp_path):
    server, out = serve(), tmp_path / "sub" / "model.safetensors"
    r = run("--url", server.url, "--sha256", SHA.upper(), "--out", out)
    assert r.returncode == 0, r.stderr
    assert out.read_bytes() == BODY and "sha256 verified" in r.stdout

    r = run("--url", f"http://127.0.0.1:{closed_port()}/m.safetensors", "--sha256", SHA, "--out", tmp_path / "m")
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert r.stderr.startswith("error: Could not download") and "Traceback" not in r.stderr

    for folder in (tmp_path / "sub", f"{tmp_path / 'new'}/"):  # a folder, or a name ending in /: the URL's file name
        server.ranges.clear()
        r = run("--url", server.url, "--sha256", SHA, "--out", folder)
        assert r.returncode == 0, r.stderr
        assert (Path(folder) / "model.safetensors").read_bytes() == BODY

    r = run("--url", server.url)  # a URL without its checksum is refused before anything is fetched
    assert r.returncode == 2 and "--url needs --sha256" in r.stderr and server.ranges == [None]


@pytest.mark.skipif(os.name != "posix", reason="sends SIGINT")
def test_ctrl_c_keeps_the_part_file_for_resuming(serve, tmp_path):
    server, out = serve(stall_after=70_000), tmp_path / "model.safetensors"
    cmd = [sys.executable, "-m", "minidb.fetch", "--url", server.url, "--sha256", SHA, "--out", out]
    # SIG_DFL: Python turns SIGINT into KeyboardInterrupt only where it is not ignored (as it is in background jobs).
    p = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "no_proxy": "*"}, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 30
    while not (part_path(out).exists() and part_path(out).stat().st_size == 70_000) and time.monotonic() < deadline:
        time.sleep(0.01)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=30)
    assert p.returncode == 130 and f"{part_path(out)} is kept; run the same command again" in err
    assert "Traceback" not in err and part_path(out).read_bytes() == BODY[:70_000]

    assert run("--url", server.url, "--sha256", SHA, "--out", out).returncode == 0
    assert server.ranges == [None, "bytes=70000-"] and out.read_bytes() == BODY


def test_known_models_fetch_their_file(serve, tmp_path, monkeypatch, capsys):
    """--model picks a known checkpoint's address, checksum and file name (here served locally)."""
    from minidb import fetch as f
    server = serve()
    monkeypatch.setattr(f, "MODELS", {**f.MODELS, "sdxl": (server.url, SHA, len(BODY))})
    monkeypatch.setattr(f, "WEIGHTS", tmp_path)
    assert f.main(["--model", "sdxl"]) == 0
    assert (tmp_path / server.url.rsplit("/", 1)[1]).read_bytes() == BODY


def test_known_models_match_the_weights_readme():
    """Every checkpoint `--model` knows is in weights/README.md's table with the same file, size and sha256."""
    from minidb.fetch import MODELS
    readme = (ROOT / "weights" / "README.md").read_text()
    for url, sha256, size in MODELS.values():
        repo, file = re.fullmatch(r"https://huggingface.co/(.+)/resolve/main/(.+)", url).groups()
        row = next(line for line in readme.splitlines() if line.startswith("|") and f"`{file}`" in line)
        assert f"`{repo}`" in row and f"{size:,}" in row and f"`{sha256}`" in row


@pytest.mark.parametrize("url", ["http://[::1", "", "http:///model.safetensors", "notaurl", "https://example.com/",
                                 "ftp://example.com/model.safetensors"])
def test_cli_refuses_an_address_it_cannot_download(tmp_path, monkeypatch, capsys, url):
    """A malformed, empty or hostless --url, one that names no file when --out is not given, or an ftp:// one
    (urllib's answer has no length: an AttributeError traceback), is refused as an address before anything
    is written (no traceback, no 'weights: Is a directory')."""
    from minidb import fetch as f
    monkeypatch.setattr(f, "WEIGHTS", tmp_path)
    with pytest.raises(SystemExit) as e:
        f.main(["--url", url, "--sha256", SHA])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err and list(tmp_path.iterdir()) == []
    last = err.splitlines()[-1]
    assert last.startswith(f"python -m minidb.fetch: error: --url {url!r} ")
    assert last.endswith("give --out a file name too" if url.endswith("/") else "give an https:// URL")


def test_model_and_url_together_are_refused(tmp_path, monkeypatch, capsys):
    """--url fetched its file and --model went unread, without a word."""
    from minidb import fetch as f
    monkeypatch.setattr(f, "WEIGHTS", tmp_path)
    with pytest.raises(SystemExit) as e:
        f.main(["--model", "sdxl", "--url", f"http://127.0.0.1:{closed_port()}/m.safetensors", "--sha256", SHA])
    assert e.value.code == 2 and list(tmp_path.iterdir()) == []
    assert capsys.readouterr().err.splitlines()[-1] == (
        "python -m minidb.fetch: error: --model sdxl and --url name two files; give one of them")


def test_cli_names_the_file_that_stands_where_a_folder_should_be(tmp_path, capsys):
    from minidb import fetch as f
    afile = tmp_path / "afile"
    afile.write_bytes(b"keep me")
    for out in (afile / "m.safetensors", afile / "sub" / "m.safetensors"):
        assert f.main(["--url", f"http://127.0.0.1:{closed_port()}/m.safetensors", "--sha256", SHA, "--out", str(out)]) == 2
        assert capsys.readouterr().err == f"error: {afile} is a file, not a folder; choose another --out.\n"
    assert afile.read_bytes() == b"keep me"


def test_a_file_url_is_refused_as_needing_no_download(tmp_path, capsys):
    """file:///... passed the address check, then ended in an AttributeError traceback (urllib's answer for a
    file has no length)."""
    from minidb import fetch as f
    (tmp_path / "model.safetensors").write_bytes(BODY)
    url = (tmp_path / "model.safetensors").as_uri()
    with pytest.raises(SystemExit) as e:
        f.main(["--url", url, "--sha256", SHA, "--out", str(tmp_path / "w" / "model.safetensors")])
    assert e.value.code == 2 and not (tmp_path / "w").exists()
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"python -m minidb.fetch: error: --url {url!r} names a file already on this machine, which needs no download; "
        f"pass its path to --model, or move it into {f.WEIGHTS}/")


@pytest.mark.skipif(os.name != "posix", reason="/dev/null and mkfifo")
def test_an_out_that_is_a_device_or_pipe_is_named_as_one(tmp_path, capsys):
    """It said "/dev/null already exists but its sha256 is ...; move it away or delete it"."""
    from minidb import fetch as f
    pipe = tmp_path / "pipe"
    os.mkfifo(pipe)
    for out in (os.devnull, pipe):
        assert f.main(["--url", f"http://127.0.0.1:{closed_port()}/m.safetensors", "--sha256", SHA, "--out", str(out)]) == 2
        assert capsys.readouterr().err == (f"error: {out} is a device or a pipe, not a file, so the download cannot be "
                                           "saved there; give --out a file path (or a folder to save it in).\n")
    assert not part_path(pipe).exists()
