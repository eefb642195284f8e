"""The run gallery on Ray Serve: similarity search over a finished RUN, its pictures and a page to browse them.

One deployment (:class:`GalleryService`) behind Serve's HTTP proxy, routed by a FastAPI app through
``@serve.ingress``, answers

    GET  /  (or /index.html)     the page (onray/page: plain HTML, JS and CSS, no build step, no CDN)
    GET  /page/<file>            the page's script and style sheet
    GET  /api/run                the run's metrics, models, pictures and the query grid's test ids (JSON)
    GET  /api/map                the embedding map: t-SNE points of test images, classes, clusters (map.json)
    POST /search                 form fields: image (a file) or id (a test or train image id); k; model
    GET  /image/<id>             a stored image as PNG
    GET  /figure/<name>.png      a picture of RUN/eval (loss curves, t-SNE, clusters, retrieval grid)

(HEAD too wherever GET is.) Searching is :class:`lib.search.Searcher`'s, the same as ``jobs.search``'s: the
model and the saved faiss index are loaded once per replica (other models on first use). Concurrent queries are
batched with ``@serve.batch``: one forward pass and one index search per batch. A bad request gets a 4xx and
one line (``{"error": ...}``), as does a path or method nothing is served at; nothing a client sends takes the
replica down. FastAPI's generated docs are off: the URLs above are all there is.

``jobs.serve`` starts it; ``serve run onray.serve:build_app run_dir=RUN [model=NAME]`` does too.
"""

# No `from __future__ import annotations` here: FastAPI reads the routes' parameter types (Request) from their
# annotations, and Serve ships the routes to the replica by value, where a name in a string annotation is unknown.
import asyncio
import contextlib
import io
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from ray import serve
from starlette.exceptions import HTTPException
from starlette.responses import FileResponse, JSONResponse, Response

from lib.console import log
from lib.errors import UserError
from lib.gallery import UnknownImage, UploadTooLarge

PAGE = Path(__file__).with_name("page")
PAGE_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
              ".css": "text/css; charset=utf-8"}
MAX_K = 100


@dataclass(frozen=True)
class GallerySettings:
    """What a replica needs: the run, the default model and the limits on requests."""

    run_dir: str
    model: str = ""
    max_upload_bytes: int = 5 * 1024 * 1024
    max_upload_pixels: int = 40_000_000
    max_batch_size: int = 16
    batch_wait_ms: float = 2.0
    torch_threads: int = 0  # 0: the replica's CPUs
    replica_cpus: int = 1
    replica_gpus: float = 0.0  # a share of one GPU; 0 runs the network on the replica's CPUs


@dataclass
class Query:
    """One search waiting for its batch: pixels (H, W, 3) to embed, or a stored embedding."""

    model: str
    k: int
    pixels: np.ndarray | None = None
    vector: np.ndarray | None = None
    own_row: int = -1


class BadRequest(Exception):
    """An HTTP error answer with its status and one-line reason."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status = status


def error_status(err: Exception) -> int:
    if isinstance(err, BadRequest):
        return err.status
    if isinstance(err, UploadTooLarge):
        return 413
    if isinstance(err, UnknownImage):
        return 404
    return 400 if isinstance(err, UserError) else 500


def error_answer(request: Request, err: Exception) -> JSONResponse:
    """The answer to a request that failed: its status (:func:`error_status`) and ``{"error": one line}``.
    An unexpected failure (500) is logged too."""
    status = error_status(err)
    reason = str(err).splitlines()[0] if str(err) else type(err).__name__
    if status == 500:
        reason = f"internal error: {type(err).__name__}: {reason}"
        log(f"{request.method} {request.url.path}: {reason}")
    return JSONResponse({"error": reason}, status_code=status)


def parse_k(value: Any) -> int:
    try:
        k = int(str(value))
    except ValueError:
        raise UserError(f"k must be a whole number, got {str(value)[:40]!r}") from None
    if not 1 <= k <= MAX_K:
        raise UserError(f"k must be between 1 and {MAX_K}, got {k}")
    return k


# The routes are GalleryService's methods below. serve.ingress ships the app, routes included, to the replica by
# value when the class is defined, with the module names the routes use as they are at that moment: what the
# routes call is defined above this line.
app = FastAPI(title="run gallery", docs_url=None, redoc_url=None, openapi_url=None)
GET_OR_HEAD = ["GET", "HEAD"]


@app.middleware("http")
async def answer_every_failure(request: Request, call_next) -> Response:
    """Every failure of a route is an answer (a 4xx for the client's, 500 for ours); the replica stays up."""
    request.state.started = time.perf_counter()
    try:
        return await call_next(request)
    except Exception as err:  # noqa: BLE001 - every failure is an answer; the replica stays up
        return error_answer(request, err)


@app.exception_handler(HTTPException)
async def nothing_served_here(request: Request, err: HTTPException) -> JSONResponse:
    """The router's misses: a method other than GET, HEAD (and POST on /search) is a 405, a path without a
    route a 404, each with the one line that says what is served."""
    path, method = request.url.path, request.method
    if err.status_code not in (404, 405):
        return error_answer(request, BadRequest(err.status_code, str(err.detail)))
    if method not in GET_OR_HEAD:
        return error_answer(request, BadRequest(405, f"{method} {path} is not served (POST /search, GET for the rest)"))
    return error_answer(request, BadRequest(404, f"nothing at {path} (see / for the page, POST /search for the API)"))


@serve.deployment(ray_actor_options={"num_cpus": 1}, max_ongoing_requests=64)
@serve.ingress(app)
class GalleryService:
    """The run gallery's one deployment: page, images, figures and batched search."""

    def __init__(self, settings: GallerySettings):
        import ray
        import torch

        from lib.data.reader import PreparedData
        from lib.devices import cuda_unusable_reason
        from lib.gallery import ImageStore
        from lib.paths import RunPaths
        from lib.search import Searcher
        from onray.ray_internals import bind_replica_grpc_to_loopback

        # Serve's own gRPC server in this replica (started after this __init__) listens where the node does: on a
        # local Ray, loopback only, not every interface
        bind_replica_grpc_to_loopback()
        if ray.get_gpu_ids() and not torch.cuda.is_available():
            raise RuntimeError(cuda_unusable_reason())  # never a silent CPU fallback on a GPU replica
        self.device = "cuda" if ray.get_gpu_ids() else "cpu"
        # Ray pins an actor to one thread; a CPU replica's forward passes get the CPUs it asked for
        torch.set_num_threads(settings.torch_threads or settings.replica_cpus)
        self.settings = settings
        self.run = RunPaths.of(settings.run_dir)
        started = time.perf_counter()
        default = Searcher(self.run, settings.model, self.device)
        self.searchers = {default.model: default}
        self.default_model = default.model
        self.images = ImageStore(PreparedData.open(default.info["data_dir"]))
        self.search_batch.set_max_batch_size(settings.max_batch_size)
        self.search_batch.set_batch_wait_timeout_s(settings.batch_wait_ms / 1000)
        self._warm_up(default)
        log(f"gallery of {self.run.root}: model {default.model}, {default.gallery.index.ntotal} gallery images, "
            f"on {self.device}, ready in {time.perf_counter() - started:.1f} s")

    @staticmethod
    def _warm_up(searcher) -> None:
        """One search before the first request, so the first person's query is as fast as the next."""
        with contextlib.suppress(UserError):  # a model that embeds no images (stacked) answers test ids only
            searcher.search_images(np.zeros((1, *searcher.info["image_shape"]), np.uint8), 1)
        searcher.stored_queries([str(searcher.test_embeddings()[0][0])])

    def searcher(self, model: str):
        from lib.search import Searcher

        model = model or self.default_model
        if model not in self.searchers:
            self.searchers[model] = Searcher(self.run, model, self.device)  # a UserError for an unknown model
        return self.searchers[model]

    @app.api_route("/", methods=GET_OR_HEAD)
    @app.api_route("/index.html", methods=GET_OR_HEAD)
    async def page(self) -> FileResponse:
        return FileResponse(PAGE / "index.html", media_type=PAGE_TYPES[".html"])

    @app.api_route("/page/{name:path}", methods=GET_OR_HEAD)
    async def page_file(self, name: str) -> FileResponse:
        if "/" in name or not (PAGE / name).is_file() or Path(name).suffix not in PAGE_TYPES:
            raise UnknownImage(f"no page file {name!r}")
        return FileResponse(PAGE / name, media_type=PAGE_TYPES[Path(name).suffix])

    @app.api_route("/api/run", methods=GET_OR_HEAD)
    async def run_overview(self) -> JSONResponse:
        return JSONResponse(self.overview())

    @app.api_route("/api/map", methods=GET_OR_HEAD)
    async def embedding_map(self) -> JSONResponse:
        from lib.gallery import read_tsne_map

        return JSONResponse(read_tsne_map(self.run))  # a 404 with its reason when the run has no usable map

    @app.api_route("/image/{image_id:path}", methods=GET_OR_HEAD)
    async def image(self, image_id: str) -> Response:
        png = self.images.png(image_id)
        return Response(png, media_type="image/png", headers={"Cache-Control": "max-age=3600"})

    @app.api_route("/figure/{name:path}", methods=GET_OR_HEAD)
    async def figure(self, name: str) -> FileResponse:
        from lib.gallery import figure_path

        return FileResponse(figure_path(self.run, name), media_type="image/png")

    @app.post("/search")
    async def search_form(self, request: Request) -> JSONResponse:
        return JSONResponse(await self.search(request, request.state.started))

    def overview(self) -> dict[str, Any]:
        from lib.gallery import run_overview

        searcher = self.searchers[self.default_model]
        test_ids, test_labels, _ = searcher.test_embeddings()
        return run_overview(self.run, self.default_model, searcher.classes, test_ids, test_labels)

    async def search(self, request, started: float) -> dict[str, Any]:
        """One query from a form (multipart or urlencoded): ``image`` (a file) or ``id``; ``k``; ``model``."""
        from lib.gallery import check_upload

        limit = self.settings.max_upload_bytes
        length = request.headers.get("content-length", "")
        if not length.isdigit():
            raise BadRequest(411, "send the form with a Content-Length header")
        if int(length) > limit + 64 * 1024:  # room for the multipart framing and the other fields
            raise UploadTooLarge(f"the request has {length} bytes, more than the upload limit of {limit}")
        try:
            form = await request.form(max_files=1, max_fields=8)
        except Exception as err:  # noqa: BLE001 - a malformed form is the client's
            raise UserError(f"cannot parse the form: {type(err).__name__}: {err}".splitlines()[0]) from None
        unknown = sorted(set(form.keys()) - {"image", "id", "k", "model"})
        if unknown:
            raise UserError(f"unknown form field {unknown[0]!r} (send image or id, and optionally k and model)")
        k = parse_k(form.get("k", "5"))
        searcher = self.searcher(str(form.get("model", "")))
        image, image_id = form.get("image"), form.get("id")
        if (image is None) == (image_id is None):
            raise UserError("send one of the form fields image (a file) or id (a test or train image id)")
        query = Query(searcher.model, k)
        if image is not None:
            if isinstance(image, str):
                raise UserError("the form field image must be a file upload (multipart/form-data)")
            data = await image.read()
            check_upload(data, limit, self.settings.max_upload_pixels)
            query.pixels = searcher.decode_image(io.BytesIO(data), name=image.filename or "the upload")
            label = None
            searcher.load_network()  # a model that embeds no images (stacked) is a 400 here, not in the batch
        else:
            labels, vectors, rows = searcher.stored_queries([str(image_id)])
            query.vector, query.own_row, label = vectors[0], int(rows[0]), searcher.classes[labels[0]]
        similarities, rows, batch = await self.search_batch(query)
        gallery = searcher.gallery
        return {"model": searcher.model, "k": k, "batch": batch,
                "query": {"id": None if image_id is None else str(image_id), "label": label},
                "neighbours": [{"id": str(gallery.ids[row]), "label": searcher.classes[gallery.labels[row]],
                                "similarity": round(float(similarity), 6)}
                               for row, similarity in zip(rows, similarities, strict=True)],
                "ms": round(1000 * (time.perf_counter() - started), 2)}

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.002)
    async def search_batch(self, queries: list[Query]) -> list[tuple[np.ndarray, np.ndarray, int]]:
        """:meth:`answer_batch` in a worker thread: the forward pass and the index search never block the replica's
        event loop, so the page, images and the next batch's queries are taken while a batch computes."""
        return await asyncio.to_thread(self.answer_batch, queries)

    def answer_batch(self, queries: list[Query]) -> list[tuple[np.ndarray, np.ndarray, int]]:
        """Each model's queries in one forward pass (uploads) and one index search: (similarities, rows, batch
        size) per query. A train id's own row is left out of its neighbours."""
        answers: list[Any] = [None] * len(queries)
        for model in {q.model for q in queries}:
            searcher = self.searchers[model]
            for uploads in (True, False):
                members = [i for i, q in enumerate(queries) if q.model == model and (q.pixels is not None) == uploads]
                if not members:
                    continue
                k = min(max(queries[i].k for i in members) + 1, searcher.gallery.index.ntotal)
                if uploads:
                    similarities, rows = searcher.search_images(np.stack([queries[i].pixels for i in members]), k)
                else:
                    similarities, rows = searcher.nearest(np.stack([queries[i].vector for i in members]), k)
                for position, i in enumerate(members):
                    keep = rows[position] != queries[i].own_row
                    answers[i] = (similarities[position][keep][:queries[i].k], rows[position][keep][:queries[i].k],
                                  len(queries))
        return answers


def gallery_deployment(settings: GallerySettings):
    """The deployment with the resources ``settings`` plan for its replica (CPUs, a share of a GPU)."""
    return GalleryService.options(ray_actor_options={"num_cpus": settings.replica_cpus,
                                                     "num_gpus": settings.replica_gpus})


def gallery_app(settings: GallerySettings):
    """The Serve application (bind the deployment to its settings)."""
    return gallery_deployment(settings).bind(settings)


def build_app(args: dict[str, str]):
    """``serve run onray.serve:build_app run_dir=RUN [model=NAME] [max_upload_bytes=N]``: Serve's app builder."""
    known = {"run_dir", "model", "max_upload_bytes", "max_batch_size", "batch_wait_ms", "torch_threads",
             "replica_cpus", "replica_gpus"}
    unknown = sorted(set(args) - known)
    if unknown or "run_dir" not in args:
        raise UserError(f"serve run onray.serve:build_app takes run_dir=RUN and optionally "
                        f"{', '.join(sorted(known - {'run_dir'}))}; got {', '.join(unknown) or 'no run_dir'}")
    types = {"max_upload_bytes": int, "max_batch_size": int, "batch_wait_ms": float, "torch_threads": int,
             "replica_cpus": int, "replica_gpus": float}
    return gallery_app(GallerySettings(**{key: types.get(key, str)(value) for key, value in args.items()}))


def start_gallery(settings: GallerySettings, host: str, port: int, name: str = "gallery") -> str:
    """Start Serve's proxy on ``host:port`` (on the Ray this process is attached to) and the gallery app
    behind it; returns its URL once the replica answers."""
    serve.start(http_options={"host": host, "port": port})
    serve.run(gallery_app(settings), name=name, route_prefix="/", blocking=False)
    return f"http://{host}:{port}/"
