"""`mlsctl serve`: a real server on 127.0.0.1, a real HTTP client (urllib, raw sockets), every
endpoint and error; who may write (issue 23, item 1), what a request may cost (items 2, 3), one
sentence and one log line per failed request (items 6, 7, 9)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import cli, cli_env, run_cli

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def multipart(files: list[tuple[str, bytes]], field: str = "photos") -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    body = b""
    for name, data in files:
        body += (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"{name}\"\r\n"
                 f"Content-Type: application/octet-stream\r\n\r\n").encode() + data + b"\r\n"
    return body + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def call(base: str, method: str, path: str, files=None, body=None, token=None, headers=None) -> tuple[int, dict]:
    data, sent = None, dict(headers or {})
    if files is not None:
        data, sent["Content-Type"] = multipart(files)
    elif body is not None:
        data, sent["Content-Type"] = json.dumps(body).encode(), "application/json"
    if token is not None:
        sent["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(base + path, data=data, method=method, headers=sent)
    try:
        with urllib.request.urlopen(request, timeout=120) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def raw_exchange(port: int, head: str, body_parts=(), pause: float = 0.0) -> tuple[int, bytes, int]:
    """Send ``head`` and then ``body_parts`` on a socket until the server answers or closes; returns
    (status, the answer's body, bytes of body sent)."""
    sent = 0
    with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
        s.sendall(head.encode())
        for part in body_parts:
            try:
                s.sendall(part)
                sent += len(part)
            except (BrokenPipeError, ConnectionResetError):
                break
            if pause:
                time.sleep(pause)
        answer = b""
        try:
            while b"\r\n\r\n" not in answer or len(answer.split(b"\r\n\r\n", 1)[1]) < _length(answer):
                chunk = s.recv(65536)
                if not chunk:
                    break
                answer += chunk
        except (ConnectionResetError, socket.timeout):
            pass
    status = int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/") else 0
    return status, answer.split(b"\r\n\r\n", 1)[-1], sent


def _length(answer: bytes) -> int:
    for line in answer.split(b"\r\n\r\n", 1)[0].split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return int(line.split(b":")[1])
    return 0


@dataclass
class Server:
    base: str
    port: int
    gallery: Path
    mile_run: Path
    token: str | None
    log: Path
    process: subprocess.Popen
    tmp: Path

    def lines(self) -> list[str]:
        return self.log.read_text().splitlines()

    def rss_mb(self, field: str = "VmRSS") -> float:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
        raise AssertionError(field)

    def reset_peak(self) -> None:
        Path(f"/proc/{self.process.pid}/clear_refs").write_text("5")


@contextlib.contextmanager
def running(gallery: Path, mile_run: Path, *args: str):
    """``mlsctl serve GALLERY ARGS`` on a free port of 127.0.0.1, its log and temp folder its own."""
    folder = gallery.parent
    tmp = folder / f"tmp-{uuid.uuid4().hex[:6]}"
    tmp.mkdir()
    port = free_port()
    log = folder / f"serve-{port}.log"
    with open(log, "w") as out:
        process = subprocess.Popen([sys.executable, "-m", "mlsctl", "serve", str(gallery), "--port", str(port), *args],
                                   env=dict(cli_env(), TMPDIR=str(tmp)), stderr=out, stdout=out)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while time.time() < deadline and process.poll() is None:
            try:
                if call(base, "GET", "/health")[0] == 200:
                    break
            except OSError:
                time.sleep(0.2)
        assert process.poll() is None, log.read_text()
        token_file = gallery / ".mlsctl.token"
        token = token_file.read_text().strip() if token_file.exists() else None
        yield Server(base, port, gallery, mile_run, token, log, process, tmp)
    finally:
        process.terminate()
        process.wait(timeout=60)


def built_gallery(mile_run: Path, folder: Path) -> Path:
    gallery = folder / "g"
    run_cli("index", "build", str(mile_run / "gallery"), "--run", str(mile_run / "run"), "--out", str(gallery), check=True)
    return gallery


@pytest.fixture(scope="module")
def server(mile_run, tmp_path_factory):
    gallery = built_gallery(mile_run, tmp_path_factory.mktemp("served"))
    with running(gallery, mile_run, "--root", str(mile_run), "--max-upload-mb", "0.05", "--allow-host",
                 "search.example") as server:
        yield server
    assert not (gallery / ".mlsctl.token").exists()  # the token dies with the server


def photo(mile_run: Path, obj: str, k: int = 0) -> tuple[str, bytes]:
    path = sorted((mile_run / "gallery" / obj).iterdir())[k]
    return path.name, path.read_bytes()


def bomb(side: int, mode: str = "L") -> bytes:
    """A PNG of side² pixels that compresses to a few KB."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new(mode, (side, side)).save(buffer, format="PNG")
    return buffer.getvalue()


# ----------------------------------------------------------------------------------- the API


def test_health_search_add_and_get(server):
    base, gallery, mile_run, token = server.base, server.gallery, server.mile_run, server.token
    status, health = call(base, "GET", "/health")
    assert status == 200 and health["objects"] == 6 and health["status"] == "ok"
    status, found = call(base, "POST", "/search?k=3", files=[photo(mile_run, "obj3", 0), photo(mile_run, "obj3", 1)])
    assert status == 200 and found["results"][0]["object"] == "obj3" and len(found["results"]) == 3
    assert found["results"][0]["score"] == pytest.approx(1.0, abs=1e-4)  # the object's own photos
    status, by_path = call(base, "POST", "/search", body={"paths": ["gallery/obj3/0.png", "gallery/obj3/1.png"]})
    assert status == 200 and by_path["results"][0]["object"] == "obj3"
    status, added = call(base, "POST", "/objects/new%20one/photos", files=[photo(mile_run, "obj1")], token=token)
    assert status == 200 and added == {"object": "new one", "created": True, "photos": 1, "objects": 7}
    status, again = call(base, "POST", "/objects/new%20one/photos", files=[photo(mile_run, "obj1", 1)], token=token)
    assert status == 200 and not again["created"] and again["photos"] == 2
    assert call(base, "GET", "/objects/new%20one") == (200, {"object": "new one", "photos": 2})
    # persisted: the gallery on disk has the object (its writer is the server, so read-only here)
    from mlsctl.gallery import Gallery

    assert Gallery(gallery).count("new one") == 2
    # the server holds the gallery: a second writer is refused naming it
    refused = run_cli("index", "add", str(gallery), "--object", "x", str(mile_run / "query" / "obj0" / "2.png"))
    assert refused.returncode == 1 and "mlsctl serve" in refused.stderr


def test_an_upload_equals_index_add_of_the_same_file(server, tmp_path):
    """The server decodes and resizes a photo the way `index add` does: same latent, bit for bit."""
    from mlsctl.gallery import Gallery, load_images, load_set_model

    path = server.mile_run / "query" / "obj2" / "2.png"
    status, _ = call(server.base, "POST", "/objects/same/photos", files=[(path.name, path.read_bytes())],
                     token=server.token)
    assert status == 200
    model = load_set_model(server.mile_run / "run")
    cls, tokens = model.image_tokens(load_images([path]))
    assert Gallery(server.gallery).latent("same").tolist() == model.fold(None, cls, tokens).tolist()


@pytest.mark.parametrize("method, path, kwargs, status, words", [
    ("POST", "/search", {"files": [("notes.png", b"this is not an image")]}, 400, "not an image file"),
    ("POST", "/search", {"files": []}, 400, "no photo"),
    ("POST", "/search", {"body": {"paths": ["../../etc/passwd"]}}, 403, "outside the served root"),
    ("POST", "/search", {"body": {"paths": ["gallery/obj0/9.png"]}}, 404, "does not exist"),
    ("POST", "/search", {"body": {"paths": "gallery/obj0/0.png"}}, 400, "must be a list"),
    ("POST", "/search?k=0", {"files": "one"}, 400, "k must be"),
    ("POST", "/search", {"files": [("big.png", b"\x89PNG" + b"0" * 60000)]}, 413, "over the limit"),
    ("GET", "/objects/nobody", {}, 404, "no object 'nobody'"),
    ("POST", "/objects/a%0Ab/photos", {"files": "one"}, 400, "control character"),
    ("POST", "/objects/%20%20/photos", {"files": "one"}, 400, "empty or blank"),
    # item 6: client mistakes that were 500s or FastAPI's {"detail": ...}
    ("POST", "/search", {"body": {"paths": ["gallery/obj0/\u0000.png"]}}, 400, "control character"),
    ("POST", "/search", {"body": {"paths": ["a" * 5000]}}, 400, "at most 1024"),
    ("POST", "/search", {"body": {"paths": ["/".join(["b" * 300] * 3)]}}, 400, "cannot be read"),
    ("GET", "/nowhere", {}, 404, "no such endpoint"),
    ("DELETE", "/objects/obj1", {}, 405, "not allowed"),
    ("PUT", "/search", {}, 405, "not allowed"),
    ("POST", "/objects/a%2Fb/photos", {"files": "one"}, 400, "cannot contain '/'"),
    ("POST", "/search", {"files": [("p.png", b"x")] * 65}, 413, "at most 64"),
    ("POST", "/search?k=many", {"files": "one"}, 400, "does not fit the API"),
    ("POST", "/search", {"headers": {"Content-Type": "multipart/form-data"}}, 400, "no boundary"),
    ("POST", "/search", {"headers": {"Content-Type": "text/plain"}}, 415, "multipart"),
    ("GET", "/docs", {}, 404, "no such endpoint"),
    ("GET", "/redoc", {}, 404, "no such endpoint"),
    ("GET", "/openapi.json", {}, 404, "no such endpoint"),
    # item 9: ids
    ("POST", "/objects/%E2%80%8B/photos", {"files": "one"}, 400, "no visible character"),
    ("POST", "/objects/" + "x" * 70000 + "/photos", {"files": "one"}, 400, "at most 256"),
])
def test_bad_requests_get_one_sentence_and_the_server_lives_on(server, method, path, kwargs, status, words):
    if kwargs.get("files") == "one":
        kwargs = {"files": [photo(server.mile_run, "obj0")]}
    got, answer = call(server.base, method, path, token=server.token, **kwargs)
    assert got == status and words in answer["error"] and set(answer) == {"error"}, answer
    assert str(server.mile_run) not in answer["error"]  # the server's folders are nobody's business
    assert call(server.base, "GET", "/health")[0] == 200


def test_json_nested_100000_deep_is_a_400(server):
    body = b'{"paths": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    request = urllib.request.Request(server.base + "/search", data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as error:
        urllib.request.urlopen(request, timeout=60)
    assert error.value.code == 400 and "nested too deep" in json.loads(error.value.read())["error"]


def test_searches_during_adds_see_the_gallery_before_or_after(server):
    base, mile_run = server.base, server.mile_run
    errors, results = [], []

    def adder():
        for i in range(6):
            status, _ = call(base, "POST", f"/objects/burst{i}/photos", files=[photo(mile_run, "obj5")], token=server.token)
            errors.append(status) if status != 200 else None

    def searcher():
        for _ in range(12):
            status, found = call(base, "POST", "/search?k=20", files=[photo(mile_run, "obj5")])
            results.append((status, [r["object"] for r in found.get("results", [])]))

    threads = [threading.Thread(target=adder), threading.Thread(target=searcher), threading.Thread(target=searcher)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and all(status == 200 for status, _ in results)
    for _, objects in results:  # every answer is a gallery some add left: no duplicate, no half-added object
        assert len(objects) == len(set(objects)) and "obj5" in objects
    assert call(base, "GET", "/health")[1]["objects"] >= 13


# ----------------------------------------------------------------------------------- 1. who may write


def test_1_writes_need_the_token_printed_once_from_a_0600_file_beside_the_lock(server):
    token_file = server.gallery / ".mlsctl.token"
    assert (token_file.parent / ".mlsctl.lock").exists()
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600 and len(server.token) >= 32
    said = server.log.read_text()
    assert said.count(server.token) == 1  # printed once, in the curl line that uses it
    curl = next(line for line in said.splitlines() if server.token in line)
    assert f"curl -H 'Authorization: Bearer {server.token}' -F photos=@a.png {server.base}/objects/ID/photos" in curl
    one = [photo(server.mile_run, "obj2")]
    for headers, words in (({}, "writes need the server's token"),
                           ({"Authorization": "Bearer " + "x" * 43}, "token is wrong"),
                           ({"Authorization": server.token}, "token is wrong")):
        status, answer = call(server.base, "POST", "/objects/intruder/photos", files=one, headers=headers)
        assert status == 401 and words in answer["error"]
    assert call(server.base, "GET", "/objects/intruder")[0] == 404  # nothing was written
    assert call(server.base, "POST", "/objects/owner/photos", files=one, token=server.token)[0] == 200
    assert call(server.base, "POST", "/search", files=one)[0] == 200  # searches stay open on loopback


def test_1_cross_origin_writes_are_refused(server):
    one = [photo(server.mile_run, "obj4")]
    before = call(server.base, "GET", "/objects/obj4")[1]["photos"]
    for headers in ({"Origin": "http://evil.example"}, {"Origin": "null"},
                    {"Origin": f"http://localhost:{server.port + 1}"}, {"Sec-Fetch-Site": "cross-site"}):
        for path in ("/objects/obj4/photos", "/search"):
            status, answer = call(server.base, "POST", path, files=one, token=server.token, headers=headers)
            assert status == 403 and "another origin" in answer["error"], (headers, answer)
    assert call(server.base, "GET", "/objects/obj4")[1]["photos"] == before  # ev00007 of the issue: untouched
    same = {"Origin": server.base, "Sec-Fetch-Site": "same-origin"}
    assert call(server.base, "POST", "/objects/obj4/photos", files=one, token=server.token, headers=same)[0] == 200


def test_1_hosts_other_than_the_bound_address_localhost_or_allowed_are_refused(server):
    one = [photo(server.mile_run, "obj1")]
    for host in (f"attacker.example:{server.port}", "attacker.example", f"127.0.0.1.attacker.example:{server.port}"):
        for method, path, files in (("GET", "/health", None), ("POST", "/objects/obj1/photos", one)):
            status, answer = call(server.base, method, path, files=files, token=server.token, headers={"Host": host})
            assert status == 403 and "does not answer to the host" in answer["error"], (host, answer)
    for host in (f"localhost:{server.port}", f"127.0.0.1:{server.port}", "search.example", f"SEARCH.example:{server.port}"):
        assert call(server.base, "GET", "/health", headers={"Host": host})[0] == 200, host


def test_1_health_shows_no_absolute_path(server):
    _, health = call(server.base, "GET", "/health")
    assert health["gallery"] == "g" and str(server.gallery.parent) not in json.dumps(health)


def test_1_read_only_serves_searches_only(mile_run, tmp_path):
    gallery = built_gallery(mile_run, tmp_path)
    with running(gallery, mile_run, "--read-only") as server:
        assert server.token is None and not (gallery / ".mlsctl.token").exists()
        one = [photo(mile_run, "obj1")]
        status, answer = call(server.base, "POST", "/objects/obj1/photos", files=one)
        assert status == 403 and "read-only" in answer["error"]
        assert call(server.base, "POST", "/search", files=one)[0] == 200
        assert call(server.base, "GET", "/health")[1]["read_only"] is True
        assert "Bearer" not in server.log.read_text()


def test_1_a_token_file_guards_every_request_but_health(mile_run, tmp_path):
    gallery = built_gallery(mile_run, tmp_path)
    secret = tmp_path / "secret"
    secret.write_text("s3cret-" * 4 + "\n")
    secret.chmod(0o600)
    with running(gallery, mile_run, "--token-file", str(secret)) as server:
        assert server.token is None  # nothing generated: the operator's secret is used
        one = [photo(mile_run, "obj1")]
        assert call(server.base, "GET", "/health")[0] == 200
        for method, path, files in (("POST", "/search", one), ("GET", "/objects/obj1", None),
                                    ("POST", "/objects/obj1/photos", one)):
            assert call(server.base, method, path, files=files)[0] == 401
            assert call(server.base, method, path, files=files, token="s3cret-" * 4)[0] == 200
        assert "s3cret" not in server.log.read_text()  # the operator's secret is never printed


def test_1_listening_beyond_loopback_needs_a_token_file_and_a_private_one(mile_run, tmp_path, capsys):
    from test_hardening import one_sentence

    code, _, err = cli("serve", str(tmp_path / "g"), "--host", "0.0.0.0", capsys=capsys)
    assert code == 2 and "--token-file" in one_sentence(err) and "beyond this machine" in err
    code, _, err = cli("serve", str(tmp_path / "g"), "--host", "0.0.0.0", "--read-only", capsys=capsys)
    assert code == 2 and "--token-file" in one_sentence(err)
    secret = tmp_path / "secret"
    secret.write_text("s3cret-" * 4)
    secret.chmod(0o644)
    code, _, err = cli("serve", str(tmp_path / "g"), "--token-file", str(secret), capsys=capsys)
    assert code == 2 and "chmod 600" in one_sentence(err)
    secret.write_text("short")
    secret.chmod(0o600)
    code, _, err = cli("serve", str(tmp_path / "g"), "--token-file", str(secret), capsys=capsys)
    assert code == 2 and "at least 16 characters" in one_sentence(err)
