"""``mimkit explore``: a local web page to see what one or several checkpoints learned.

Pick an image of ``--data`` (paged, searchable) or upload one; move the mask ratio, pick the mask kind and seed;
see the paper's reconstruction panels with the loss on the hidden patches and a per-patch error map (MAE
checkpoints that predict pixels), the class token's attention in a chosen block and head, the first three
principal components of the patch features as colours, and the nearest images of ``--data`` in feature space.
Every number and picture comes from :mod:`mimkit.views`, the functions ``mimkit viz`` and ``mimkit reconstruct``
use, so the page's loss for an image equals ``mimkit reconstruct``'s on that file.

Serving: FastAPI (on Starlette) under uvicorn, with one static page shipped in the package
(``mimkit/static/explore.html``, plain HTML and JavaScript). Gradio is the field's convention for model demos,
but it is a much larger dependency whose frontend must be checked for fonts or scripts fetched from a CDN and
whose analytics must be switched off to work offline; a single page of our own loads nothing but this server's
own endpoints (its Content-Security-Policy forbids anything else) and sends no telemetry.

Safety: the server listens on the loopback unless ``--host`` says otherwise (then it warns); images are served
by their index or by their name inside ``--data``, never by a path from the request: names with ``..``,
absolute paths and symlinks leading out of the folder are refused. Uploads are held in memory, checked for size
and pixel count before they are decoded, and a file that cannot be used is a message on the page.
"""
import base64
import io
import ipaddress
import json
import logging
import os
import socket
import threading
import uuid
from collections import OrderedDict
from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path
from typing import List, Optional

import numpy as np
import torch
from PIL import Image

from . import views
from .checkpoints import load, read
from .data import decode_image, load_input, open_images, spread_over_classes
from .data.source import BytesSource, FolderSource
from .errors import BadImage, CheckpointError, ConfigError, DataError
from .features import checkpoint_id
from .models import MaskedAutoencoder

log = logging.getLogger("mimkit")
MAX_UPLOADS = 32  # uploads kept in memory (the oldest goes first)
PAGE_SIZE = 24


class Refused(Exception):
    """A request the server does not serve (a path out of --data); HTTP 403."""


class Missing(Exception):
    """No such image or upload; HTTP 404."""


# the checkpoints ---------------------------------------------------------------------------------------------
class Model:
    """One checkpoint as the page shows it: its encoder, its MAE when it reconstructs pixels, its index."""

    def __init__(self, path: str):
        src = read(path)
        model = load(src)
        self.path, self.label = path, Path(path.rstrip("/")).name or path
        self.mae = model if isinstance(model, MaskedAutoencoder) else None
        if self.mae is not None and (src.arch or {}).get("ablation", {}).get("target") in ("pca", "tokens"):
            self.mae = None  # an MAE ablation predicting PCA coefficients or tokens: no pixels to show
        self.encoder = model.encoder if hasattr(model, "encoder") else model
        views.check_vit(self.encoder)
        self.encoder.eval()
        self.pixels = self.encoder.pixels
        self.size = self.encoder.arch["img_size"]
        self.index: Optional[views.FeatureIndex] = None
        self.index_state = {"state": "none", "done": 0, "total": 0}
        self.pca_sample = None

    def info(self) -> dict:
        return {"label": self.label, "path": self.path, "reconstructs": self.mae is not None, "img_size": self.size,
                "depth": len(self.encoder.blocks), "heads": self.encoder.blocks[0].attn.num_heads,
                "patch_size": self.encoder.patch_size, "in_chans": self.encoder.in_chans}


def load_models(spec: str) -> List[Model]:
    models = []
    for path in [p.strip() for p in spec.split(",") if p.strip()]:
        try:
            models.append(Model(path))
        except (CheckpointError, ConfigError) as e:
            raise CheckpointError(f"--checkpoint {path}: {e}") from None
    return models


# pictures -------------------------------------------------------------------------------------------------------
def png(image: torch.Tensor) -> bytes:
    """(3, H, W) in [0, 1] -> PNG bytes."""
    arr = (image.clamp(0, 1) * 255 + 0.5).byte().permute(1, 2, 0).cpu().numpy()
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(arr)).save(buf, format="PNG")
    return buf.getvalue()


def data_url(image: torch.Tensor) -> str:
    return "data:image/png;base64," + base64.b64encode(png(image)).decode()


def check_upload_size(data: bytes, name: str, max_pixels: int):
    """Refuse an image larger than ``max_pixels`` from its header, before decoding it (PIL reads sizes lazily;
    TIFF through tifffile's header; ``.npy`` through numpy's). Other failures are left to the decoder."""
    shape = None
    try:
        with Image.open(io.BytesIO(data)) as im:
            shape = im.size[::-1]
    except Exception:
        try:
            if data[:6] == b"\x93NUMPY":
                f = io.BytesIO(data)
                version = np.lib.format.read_magic(f)
                read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                    np.lib.format.read_array_header_2_0
                shape = read_header(f)[0]
            elif data[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
                import tifffile
                with tifffile.TiffFile(io.BytesIO(data)) as tif:
                    shape = tif.series[0].shape
        except Exception:
            shape = None
    if shape is not None and len(shape) >= 2:
        pixels = int(np.prod(sorted(shape)[-2:]))  # the two largest axes: height and width, whatever the layout
        if pixels > max_pixels:
            raise BadImage(name, f"has {pixels:,} pixels, more than the limit of {max_pixels:,} (--max-pixels)")


# the server's state ---------------------------------------------------------------------------------------------
class Explorer:
    """What the endpoints share: the checkpoints, the images of ``--data``, the uploads."""

    def __init__(self, models: List[Model], data: str, bands=None, max_pixels: int = 50_000_000,
                 max_upload_bytes: int = 64 * 2 ** 20, pca_images: int = 64, index_batch: int = 64):
        self.models, self.bands = models, bands
        for m in models:  # --bands: the roles shown as red, green, blue (a bad one is a one-line error at start)
            m.pixels = views.with_bands(m.pixels, bands)
        self.source = open_images(data)
        self.max_pixels, self.max_upload_bytes = max_pixels, max_upload_bytes
        self.pca_images, self.index_batch = pca_images, index_batch
        # a folder is served by name, and only what lies inside it: a symlink out of it is left out of the list
        self.root = os.path.realpath(self.source.root) if isinstance(self.source, FolderSource) else None
        self.allowed = [i for i, n in enumerate(self.source.names) if self.root is None or self._inside(n)]
        self.where = {self.source.names[i]: i for i in self.allowed}
        self.allowed_set = set(self.allowed)
        self.uploads, self.prepared = OrderedDict(), OrderedDict()
        self.lock = threading.Lock()  # one computation at a time: the CPU's threads go to it
        self.stopping, self.builders = threading.Event(), []

    def close(self):
        """Stop index builds (at their next batch) and wait for them: no thread left in torch at exit."""
        self.stopping.set()
        for t in self.builders:
            t.join()

    def _inside(self, name: str) -> bool:
        real = os.path.realpath(os.path.join(self.root, name))
        return os.path.commonpath([real, self.root]) == self.root

    # images ---------------------------------------------------------------------------------------------------
    def by_name(self, name: str) -> int:
        """The index of the image called ``name`` inside --data; refused for anything that is not such a name."""
        parts = name.replace("\\", "/").split("/")
        if not name or os.path.isabs(name) or name.startswith(("/", "\\")) or ".." in parts or ":" in parts[0]:
            raise Refused(f"{name!r}: not the name of an image inside --data")
        if self.root is not None and not self._inside(name):
            raise Refused(f"{name!r}: leads out of --data")
        if name not in self.where:
            raise Missing(f"{name!r}: no such image in --data")
        return self.where[name]

    def by_index(self, i: int) -> int:
        if i not in self.allowed_set:
            raise Missing(f"no image {i} in --data")
        return i

    def image(self, ref: dict):
        """(source, index, key) of a request's ``{"name": ...}``, ``{"index": ...}`` or ``{"upload": id}``; the key
        (the file's name) seeds its mask."""
        if "upload" in ref:
            src = self.uploads.get(str(ref["upload"]))
            if src is None:
                raise Missing("this upload is no longer held; upload it again")
            return src, 0, src.names[0]
        i = self.by_name(str(ref["name"])) if "name" in ref else self.by_index(int(ref["index"]))
        return self.source, i, self.source.names[i]

    def inputs(self, model: Model, ref: dict) -> torch.Tensor:
        """The image as the model's input; the last few are kept, since a slider move does not change it."""
        src, i, _ = self.image(ref)
        key = (id(model), f"upload:{ref['upload']}" if "upload" in ref else i)  # models live as long as the server
        if key not in self.prepared:
            batches = list(views.load_images(src, [i], model.size, model.pixels, 1))
            if not batches:
                raise DataError(f"{src.names[i]}: cannot be read as an image for this checkpoint")
            self.prepared[key] = batches[0][0]
            while len(self.prepared) > 4 * len(self.models) + MAX_UPLOADS:
                self.prepared.popitem(last=False)
        self.prepared.move_to_end(key)
        return self.prepared[key]

    def upload(self, filename: str, data: bytes) -> dict:
        name = Path(filename.replace("\\", "/")).name or "upload"
        if len(data) > self.max_upload_bytes:
            raise BadImage(name, f"is over {self.max_upload_bytes:,} bytes, the limit (--max-upload-mb)")
        check_upload_size(data, name, self.max_pixels)
        src = BytesSource(name, data)
        for m in self.models:  # decoded once per way in: the checkpoints may read files differently
            if m.pixels.is_rgb8:
                decode_image(data, name)
            else:
                load_input(src, 0, m.pixels)
        key = uuid.uuid4().hex[:12]
        self.uploads[key] = src
        while len(self.uploads) > MAX_UPLOADS:
            self.uploads.popitem(last=False)
        return {"upload": key, "name": name}

    def listing(self, query: str = "", page: int = 0, per_page: int = PAGE_SIZE) -> dict:
        q = query.lower()
        hits = [i for i in self.allowed if q in self.source.names[i].lower()]
        page = max(0, page)
        return {"total": len(hits), "page": page, "per_page": per_page, "by_name": self.root is not None,
                "images": [{"index": i, "name": self.source.names[i]}
                           for i in hits[page * per_page:(page + 1) * per_page]]}

    def thumbnail(self, ref: dict, model: int = 0) -> bytes:
        m = self.model(model)
        with self.lock:
            return png(views.display_images(self.inputs(m, ref), m.pixels)[0])

    def model(self, k: int) -> Model:
        if not 0 <= k < len(self.models):
            raise Missing(f"no checkpoint {k}")
        return self.models[k]

    # the four views -------------------------------------------------------------------------------------------
    def reconstruct(self, ref: dict, model: int, ratio: float, kind: str, seed: int) -> dict:
        m = self.model(model)
        if m.mae is None:
            raise ConfigError(f"{m.label}: this checkpoint has no decoder that predicts pixels")
        if not 0.0 < ratio < 1.0:
            raise ConfigError(f"mask ratio must be in (0, 1), got {ratio}")
        _, _, key = self.image(ref)
        with self.lock:
            x = self.inputs(m, ref)
            out = views.reconstruction(m.mae, x, [key], ratio, seed, kind, m.pixels)
        mask = out["mask"][0]
        return {"panels": [data_url(p) for p in out["panels"][0]], "error_map": data_url(out["error_map"][0]),
                "loss": out["loss"][0].item(), "zero_loss": out["zero_loss"][0].item(), "hidden": int(mask.sum()),
                "patches": mask.numel(), "errors": out["errors"][0].tolist(), "mask": mask.int().tolist(),
                "key": key, "ratio": ratio, "kind": kind, "seed": seed}

    def attention(self, ref: dict, model: int, block: int, head) -> dict:
        m = self.model(model)
        with self.lock:
            x = self.inputs(m, ref)
            maps = views.cls_attention(m.encoder, x, block)[0]  # (heads, gh, gw)
            if head in (None, "mean", -1):
                shown = maps.mean(0)
            elif 0 <= int(head) < maps.shape[0]:
                shown = maps[int(head)]
            else:
                raise ConfigError(f"head must be 'mean' or in 0..{maps.shape[0] - 1}; got {head}")
            overlay = views.attention_overlay(views.display_images(x, m.pixels), shown.unsqueeze(0))
        return {"overlay": data_url(overlay[0]), "weights": shown.flatten().tolist(), "block": block, "head": head}

    def pca(self, ref: dict, model: int, fit: str = "image") -> dict:
        m = self.model(model)
        if fit not in ("image", "sample"):
            raise ConfigError(f"fit must be 'image' or 'sample'; got {fit!r}")
        with self.lock:
            x = self.inputs(m, ref)
            feats = views.patch_features(m.encoder, x)
            if fit == "sample":
                if m.pca_sample is None:
                    m.pca_sample = views.fit_pca(self.sample_features(m))
                pca = m.pca_sample
            else:
                pca = views.fit_pca(feats[0])
            colours = views.pca_colours(feats, pca, views.grid_of(m.encoder, x))
            picture = views.upsample_grid(colours[0], x.shape[-2:]).squeeze(1)
        return {"image": data_url(picture), "explained": pca["explained"], "fit": fit}

    def sample_features(self, m: Model) -> torch.Tensor:
        picks = spread_over_classes(self.source, self.allowed, 0)[:self.pca_images]
        feats = [views.patch_features(m.encoder, x) for x, _ in views.load_images(self.source, picks, m.size, m.pixels)]
        return torch.cat(feats).flatten(0, 1)

    def neighbours(self, ref: dict, model: int, k: int = 8, pool: str = "cls") -> dict:
        m = self.model(model)
        if m.index is None:
            self.start_index(m, pool)
            return {"index": dict(m.index_state)}
        if m.index.meta.get("pool") != pool:
            raise ConfigError(f"the index of {m.label} holds {m.index.meta.get('pool')!r} features, not {pool!r}")
        src, i, _ = self.image(ref)
        with self.lock:
            q = views.extract_features(m.encoder, self.inputs(m, ref), pool)[0]
        found = m.index.nearest(q, k, exclude=i if src is self.source else None)
        return {"index": dict(m.index_state), "neighbours": found}

    def start_index(self, m: Model, pool: str):
        """Build the neighbour index in the background, once; the page polls its progress."""
        with self.lock:
            if m.index_state["state"] in ("building", "ready"):
                return
            m.index_state.update(state="building", done=0, total=len(self.allowed))

        def progress(done, total):
            if self.stopping.is_set():
                raise InterruptedError("the server is stopping")
            m.index_state.update(done=done, total=total)

        def build():
            try:
                m.index = views.FeatureIndex.build(m.encoder, self.source, self.allowed, pool, self.index_batch,
                                                   progress)
                m.index_state["state"] = "ready"
            except InterruptedError:
                m.index_state.update(state="none")
            except Exception as e:  # shown on the page; the server keeps serving
                m.index_state.update(state="error", error=str(e))
                log.exception("building the neighbour index of %s failed", m.label)

        self.builders.append(threading.Thread(target=build, name=f"index-{m.label}"))
        self.builders[-1].start()

    def use_index(self, path: str):
        """A ``mimkit embed`` output as the index of the checkpoint it was made from (checked)."""
        meta = Path(path).with_suffix(".json")
        made_from = json.loads(meta.read_text()).get("checkpoint") if meta.is_file() else None
        for m in self.models:
            if checkpoint_id(m.path) == made_from:
                m.index = views.FeatureIndex.read(path, m.path, m.size, self.source)
                m.index_state.update(state="ready", done=len(m.index.names), total=len(m.index.names))
                return
        raise DataError(f"--index {path}: made from {made_from or 'an unrecorded checkpoint'}, not from any "
                        f"--checkpoint ({', '.join(checkpoint_id(m.path) for m in self.models)})")


# the web app ----------------------------------------------------------------------------------------------------
PAGE_POLICY = ("default-src 'none'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
               "img-src 'self' data:; connect-src 'self'; form-action 'none'; base-uri 'none'")


def create_app(explorer: Explorer):
    """The FastAPI app: the page at ``/``, JSON endpoints under ``/api``."""
    from fastapi import FastAPI, File, Request, UploadFile
    from fastapi.responses import HTMLResponse, JSONResponse, Response

    @asynccontextmanager
    async def lifespan(_):
        yield
        explorer.close()

    # no /docs: FastAPI's interactive docs load their scripts from a CDN
    app = FastAPI(title="mimkit explore", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    page = resources.files("mimkit").joinpath("static/explore.html").read_text()

    @app.exception_handler(Refused)
    async def refused(_, e):
        return JSONResponse({"error": str(e)}, status_code=403)

    @app.exception_handler(Missing)
    async def missing(_, e):
        return JSONResponse({"error": str(e)}, status_code=404)

    for error in (BadImage, DataError, ConfigError, CheckpointError):
        app.add_exception_handler(error, lambda _, e: JSONResponse({"error": str(e)}, status_code=400))

    @app.middleware("http")
    async def policy(request: Request, call_next):
        response = await call_next(request)
        response.headers["Content-Security-Policy"] = PAGE_POLICY
        response.headers["X-Content-Type-Options"] = "nosniff"
        return response

    @app.get("/", response_class=HTMLResponse)
    def index():
        return page

    @app.get("/api/info")
    def info():
        return {"models": [m.info() for m in explorer.models], "images": len(explorer.allowed),
                "data": explorer.source.root, "by_name": explorer.root is not None, "bands": explorer.bands,
                "max_pixels": explorer.max_pixels}

    @app.get("/api/images")
    def images(q: str = "", page: int = 0, per_page: int = PAGE_SIZE):
        return explorer.listing(q, page, min(max(1, per_page), 200))

    @app.get("/api/thumb")
    def thumb(index: Optional[int] = None, name: Optional[str] = None, upload: Optional[str] = None, model: int = 0):
        ref = {"upload": upload} if upload else {"name": name} if name is not None else {"index": index}
        if index is None and name is None and upload is None:
            raise Missing("no image named")
        return Response(explorer.thumbnail(ref, model), media_type="image/png")

    @app.get("/api/file")
    def file(name: str):
        """The file as stored, for a folder's image by its name (never a path from outside --data)."""
        i = explorer.by_name(name)
        return Response(explorer.source.read_bytes(i), media_type="application/octet-stream")

    @app.post("/api/upload")
    async def upload(file: UploadFile = File(...)):
        data = await file.read(explorer.max_upload_bytes + 1)
        return explorer.upload(file.filename or "upload", data)

    @app.post("/api/reconstruct")
    def reconstruct(body: dict):
        return explorer.reconstruct(body["image"], int(body.get("model", 0)), float(body.get("ratio", 0.75)),
                                    str(body.get("kind", "random")), int(body.get("seed", 0)))

    @app.post("/api/attention")
    def attention(body: dict):
        return explorer.attention(body["image"], int(body.get("model", 0)), int(body.get("block", -1)),
                                  body.get("head", "mean"))

    @app.post("/api/pca")
    def pca(body: dict):
        return explorer.pca(body["image"], int(body.get("model", 0)), str(body.get("fit", "image")))

    @app.post("/api/neighbours")
    def neighbours(body: dict):
        return explorer.neighbours(body["image"], int(body.get("model", 0)), int(body.get("k", 8)),
                                   str(body.get("pool", "cls")))

    return app


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def explore(cfg):
    """CLI ``mimkit explore``: load the checkpoints (a bad one is a one-line error before anything starts), open
    ``--data``, serve the page until interrupted."""
    import uvicorn
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    models = load_models(cfg.checkpoint)
    explorer = Explorer(models, cfg.data, cfg.bands, cfg.max_pixels,
                        int(cfg.max_upload_mb * 2 ** 20), cfg.pca_images)
    for path in [p.strip() for p in cfg.index.split(",") if p.strip()]:
        explorer.use_index(path)
    if not is_loopback(cfg.host):
        log.warning("listening on %s, not the loopback: anyone who can reach this address sees the images of %s and "
                    "can upload files", cfg.host, cfg.data)
    sock = socket.socket(socket.AF_INET6 if ":" in cfg.host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((cfg.host, cfg.port))
    except OSError as e:
        raise ConfigError(f"--host {cfg.host} --port {cfg.port}: cannot listen there ({e.strerror})") from None
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    print(f"explore: http://{shown}:{port}/ ({len(models)} checkpoint(s), {len(explorer.allowed)} images of "
          f"{cfg.data}); Ctrl-C stops", flush=True)
    server = uvicorn.Server(uvicorn.Config(create_app(explorer), log_level="warning", access_log=False))
    server.run(sockets=[sock])
    return 0
