"""``mlsctl serve``: a gallery kept loaded behind an HTTP JSON API (FastAPI, served by uvicorn).

A thin face over the library calls ``search`` and ``index add`` use (:mod:`mlsctl.gallery`):

* ``POST /search?k=10`` — photos of one object, as multipart files (``photos``, repeated) or as a
  JSON body ``{"paths": [...]}`` naming files under the server's ``--root``: the ranked objects;
* ``POST /objects/{id}/photos`` — the same photo inputs, folded into object ``id`` (created when
  new): one appended gallery row, persisted before the answer;
* ``GET /objects/{id}`` — how many photos the object has folded; ``GET /health``.

The server holds the gallery's lock for its lifetime (it is the gallery's writer: a concurrent
``mlsctl index add`` is refused naming it). Photos are embedded outside any lock; the index is
searched and grown under one lock, so a search during an add sees the gallery before or after it.
Bad requests — not an image, an empty set, an unknown object, an id the gallery refuses, an upload
over the size limit, a path outside the root — get a 4xx with ``{"error": "one sentence"}``; an
unexpected failure a 500 with one sentence; the server keeps serving.
"""

import threading
import time
from pathlib import Path
from typing import Optional

from mlsctl.errors import UserError

MAX_PHOTOS = 64


class RequestError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


class GalleryService:
    """The gallery and its model, loaded once; what the endpoints call."""

    def __init__(self, gallery_path: Path, run: "Optional[Path]" = None, root: "Optional[Path]" = None,
                 max_upload_bytes: int = 20 * 2**20):
        from mlsctl.gallery import Gallery, load_set_model
        from mlsctl.locks import FolderLock

        self.lock_file = FolderLock(gallery_path, "gallery").acquire()
        try:
            self.gallery = Gallery(gallery_path)
            self.model = load_set_model(run or Path(self.gallery.manifest["model"]["run"]))
            self.gallery.check_model(self.model)
        except BaseException:
            self.lock_file.release()
            raise
        self.root = root.resolve() if root is not None else None
        self.max_upload_bytes = max_upload_bytes
        self.index_lock = threading.Lock()
        self.model_lock = threading.Lock()  # one forward pass at a time: torch threads are shared anyway

    def close(self) -> None:
        self.lock_file.release()

    # ------------------------------------------------------------------ inputs
    def decode(self, uploads: list[tuple[str, bytes]]) -> list:
        from mlsctl.data.images import BadImage, decode_rgb

        if not uploads:
            raise RequestError(400, "the request holds no photo: send files as 'photos' or a JSON body {\"paths\": [...]}")
        if len(uploads) > MAX_PHOTOS:
            raise RequestError(413, f"{len(uploads)} photos in one request; at most {MAX_PHOTOS}")
        images = []
        for name, data in uploads:
            if len(data) > self.max_upload_bytes:
                raise RequestError(413, f"{name} is {len(data):,} bytes, over the limit of {self.max_upload_bytes:,}")
            try:
                images.append(decode_rgb(data))
            except BadImage as exc:
                raise RequestError(400, f"{name} cannot be used: {exc}") from None
        return images

    def read_paths(self, paths) -> list[tuple[str, bytes]]:
        if self.root is None:
            raise RequestError(403, "this server reads no paths (start it with --root DIR); upload the photos instead")
        if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
            raise RequestError(400, "'paths' must be a list of file paths")
        out = []
        for given in paths:
            path = (self.root / given).resolve()
            if path != self.root and self.root not in path.parents:
                raise RequestError(403, f"{given} is outside the served root {self.root}")
            if not path.is_file():
                raise RequestError(404, f"{given} does not exist under {self.root}")
            if path.stat().st_size > self.max_upload_bytes:
                raise RequestError(413, f"{given} is over the size limit of {self.max_upload_bytes:,} bytes")
            out.append((given, path.read_bytes()))
        return out

    def embed(self, images: list):
        with self.model_lock:
            cls, tokens = self.model.image_tokens(images)
            return self.model.fold(None, cls, tokens), cls, tokens

    # ------------------------------------------------------------------ endpoints
    def search(self, uploads: list[tuple[str, bytes]], k: int) -> dict:
        if not 1 <= k <= 1000:
            raise RequestError(400, f"k must be between 1 and 1000, got {k}")
        started = time.perf_counter()
        latent, _, _ = self.embed(self.decode(uploads))
        with self.index_lock:
            found = self.gallery.search(latent, k)
        return {"photos": len(uploads), "results": [{"rank": i + 1, "object": o, "score": s}
                                                   for i, (o, s) in enumerate(found)],
                "seconds": round(time.perf_counter() - started, 4)}

    def add(self, object_id: str, uploads: list[tuple[str, bytes]]) -> dict:
        from mlsctl.gallery import check_object_id

        try:
            check_object_id(object_id, "object id")
        except UserError as exc:
            raise RequestError(400, exc.message) from None
        images = self.decode(uploads)
        with self.model_lock:
            cls, tokens = self.model.image_tokens(images)
        with self.index_lock:
            created = object_id not in self.gallery.row_of
            previous = None if created else self.gallery.latent(object_id)
            with self.model_lock:
                latent = self.model.fold(previous, cls, tokens)
            count = len(images) + (0 if created else self.gallery.count(object_id))
            self.gallery.append([object_id], latent[None], [count])
            total = len(self.gallery)
        return {"object": object_id, "created": created, "photos": count, "objects": total}

    def get(self, object_id: str) -> dict:
        with self.index_lock:
            if object_id not in self.gallery.row_of:
                raise RequestError(404, f"no object {object_id!r} in the gallery")
            return {"object": object_id, "photos": self.gallery.count(object_id)}

    def health(self) -> dict:
        with self.index_lock:
            objects = len(self.gallery)
        return {"status": "ok", "gallery": str(self.gallery.path), "objects": objects,
                "model": self.model.fingerprint[:12], "index": self.gallery.settings.kind}


def create_app(service: GalleryService):
    """The FastAPI application over one :class:`GalleryService`."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse

    from mlsctl import __version__

    app = FastAPI(title="mlsctl gallery", version=__version__)

    @app.exception_handler(RequestError)
    async def request_error(_, exc: RequestError):
        return JSONResponse({"error": exc.message}, status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(_, exc: RequestValidationError):
        problems = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in exc.errors())
        return JSONResponse({"error": f"the request does not fit the API ({problems})"}, status_code=400)

    @app.exception_handler(Exception)
    async def unexpected(_, exc: Exception):
        from mlsctl.errors import describe_environment_error

        message = describe_environment_error(exc) or f"internal error ({type(exc).__name__}: {exc})"
        return JSONResponse({"error": message}, status_code=500)

    async def photos_of(request: Request) -> list[tuple[str, bytes]]:
        kind = request.headers.get("content-type", "")
        if kind.startswith("application/json"):
            try:
                body = await request.json()
            except ValueError:
                raise RequestError(400, "the JSON body cannot be parsed") from None
            if not isinstance(body, dict) or "paths" not in body:
                raise RequestError(400, "the JSON body must be {\"paths\": [...]}")
            return service.read_paths(body["paths"])
        if not kind.startswith("multipart/form-data"):
            raise RequestError(400, "send photos as multipart files named 'photos', or a JSON body {\"paths\": [...]}")
        form = await request.form(max_files=MAX_PHOTOS + 1, max_part_size=service.max_upload_bytes + 1)
        out = []
        for item in form.getlist("photos"):
            if isinstance(item, str):
                raise RequestError(400, "'photos' must be files (curl -F photos=@a.png)")
            data = await item.read(service.max_upload_bytes + 1)
            out.append((item.filename or "upload", data))
        return out

    @app.get("/health")
    def health():
        return service.health()

    @app.post("/search")
    async def search(request: Request, k: int = 10):
        uploads = await photos_of(request)
        return await _threaded(service.search, uploads, k)

    @app.post("/objects/{object_id}/photos")
    async def add(object_id: str, request: Request):
        uploads = await photos_of(request)
        return await _threaded(service.add, object_id, uploads)

    @app.get("/objects/{object_id}")
    def get(object_id: str):
        return service.get(object_id)

    return app


async def _threaded(fn, *args):
    """Run blocking work (a forward pass, faiss) in a worker thread so the server stays responsive."""
    from fastapi.concurrency import run_in_threadpool

    return await run_in_threadpool(fn, *args)


def serve(gallery: Path, run: Optional[Path], host: str, port: int, root: Optional[Path], max_upload_mb: float,
          say=print) -> None:
    import uvicorn

    service = GalleryService(gallery, run, root, int(max_upload_mb * 2**20))
    try:
        say(f"serving {gallery} ({len(service.gallery)} objects, model {service.model.fingerprint[:12]}) on "
            f"http://{host}:{port} — POST /search, POST /objects/ID/photos, GET /objects/ID, GET /health")
        uvicorn.run(create_app(service), host=host, port=port, log_level="warning")
    finally:
        service.close()
