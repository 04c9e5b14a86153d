"""`mlsctl serve`: a real server on 127.0.0.1, a real HTTP client (urllib), every endpoint and error."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

from conftest import cli_env, run_cli

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def multipart(files: list[tuple[str, bytes]]) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    body = b""
    for name, data in files:
        body += (f"--{boundary}\r\nContent-Disposition: form-data; name=\"photos\"; filename=\"{name}\"\r\n"
                 f"Content-Type: application/octet-stream\r\n\r\n").encode() + data + b"\r\n"
    return body + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def call(base: str, method: str, path: str, files=None, body=None) -> tuple[int, dict]:
    data, headers = None, {}
    if files is not None:
        data, kind = multipart(files)
        headers["Content-Type"] = kind
    elif body is not None:
        data, headers["Content-Type"] = json.dumps(body).encode(), "application/json"
    request = urllib.request.Request(base + path, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=60) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


@pytest.fixture(scope="module")
def server(mile_run, tmp_path_factory):
    gallery = tmp_path_factory.mktemp("served") / "g"
    run_cli("index", "build", str(mile_run / "gallery"), "--run", str(mile_run / "run"), "--out", str(gallery), check=True)
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "mlsctl", "serve", str(gallery), "--port", str(port), "--root",
                                str(mile_run), "--max-upload-mb", "0.05"], env=cli_env(), stderr=subprocess.PIPE,
                               text=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if call(base, "GET", "/health")[0] == 200:
                break
        except OSError:
            time.sleep(0.2)
    yield base, gallery, mile_run
    process.terminate()
    process.wait(timeout=30)


def photo(mile_run: Path, obj: str, k: int = 0) -> tuple[str, bytes]:
    path = sorted((mile_run / "gallery" / obj).iterdir())[k]
    return path.name, path.read_bytes()


def test_health_search_add_and_get(server):
    base, gallery, mile_run = server
    status, health = call(base, "GET", "/health")
    assert status == 200 and health["objects"] == 6 and health["status"] == "ok"
    status, found = call(base, "POST", "/search?k=3", files=[photo(mile_run, "obj3", 0), photo(mile_run, "obj3", 1)])
    assert status == 200 and found["results"][0]["object"] == "obj3" and len(found["results"]) == 3
    assert found["results"][0]["score"] == pytest.approx(1.0, abs=1e-4)  # the object's own photos
    status, by_path = call(base, "POST", "/search", body={"paths": ["gallery/obj3/0.png", "gallery/obj3/1.png"]})
    assert status == 200 and by_path["results"][0]["object"] == "obj3"
    status, added = call(base, "POST", "/objects/new%20one/photos", files=[photo(mile_run, "obj1")])
    assert status == 200 and added == {"object": "new one", "created": True, "photos": 1, "objects": 7}
    status, again = call(base, "POST", "/objects/new%20one/photos", files=[photo(mile_run, "obj1", 1)])
    assert status == 200 and not again["created"] and again["photos"] == 2
    assert call(base, "GET", "/objects/new%20one") == (200, {"object": "new one", "photos": 2})
    # persisted: the gallery on disk has the object (its writer is the server, so read-only here)
    from mlsctl.gallery import Gallery

    assert Gallery(gallery).count("new one") == 2
    # the server holds the gallery: a second writer is refused naming it
    refused = run_cli("index", "add", str(gallery), "--object", "x", str(mile_run / "query" / "obj0" / "2.png"))
    assert refused.returncode == 1 and "mlsctl serve" in refused.stderr


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
])
def test_bad_requests_get_one_sentence_and_the_server_lives_on(server, method, path, kwargs, status, words):
    base, _, mile_run = server
    if kwargs.get("files") == "one":
        kwargs = {"files": [photo(mile_run, "obj0")]}
    got, answer = call(base, method, path, **kwargs)
    assert got == status and words in answer["error"], answer
    assert call(base, "GET", "/health")[0] == 200


def test_searches_during_adds_see_the_gallery_before_or_after(server):
    base, _, mile_run = server
    errors, results = [], []

    def adder():
        for i in range(6):
            status, _ = call(base, "POST", f"/objects/burst{i}/photos", files=[photo(mile_run, "obj5")])
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
