"""The web tool's server (FastAPI): upload an image once, then prompt it many times.

Endpoints (OpenAPI docs at ``/docs``):

- ``POST /api/images``: an image (raw ``image/*`` body or multipart ``file``) -> ``image_id`` (sha256 of
  the bytes), width, height. The embedding is computed once and kept in a byte-bounded LRU cache.
- ``POST /api/images/{id}/predict``: points / box / earlier logits / text -> masks (COCO RLE or PNG),
  scores, and a ``logits`` handle per mask to refine it with the next call; ``text`` with ``instances``:
  one mask per object the text names. With a box, parts of a mask wholly outside the box are dropped.
  ``zoom_in``: clicks and boxes answered on a crop around the object (``segany.zoom_in``; the crops'
  embeddings are cached too).
- ``POST /api/images/{id}/everything``: automatic masks (bounded generator options), with what each of the
  generator's filters removed (``filters``, ``summary``), so that an empty answer says why.
- ``GET /api/images/{id}/embedding``: the raw embedding (float32 / float16, little-endian) with its shape
  in headers, for the in-browser decoder.
- ``GET /api/decoder.onnx``: the model's ONNX decoder (exported once, kept in memory);
  ``?first_prompt_only=true``: without a correction decoder, for prompts without a mask input (the page's).
- ``POST /api/datasets/{name}/annotations``: save accepted masks as SA-1B JSON (only with a dataset dir).
- ``GET /``: the web page; ``/vendor/ort/*``: onnxruntime-web and ``/vendor/swagger/*``: Swagger UI for
  ``/docs``, both installed with npm by ``scripts/setup.sh``.

Limits (upload bytes, pixels, content type, prompt counts) answer with 4xx JSON ``{"detail": ...}``.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from fastapi import FastAPI, HTTPException, Request
from fastapi import Path as PathParam
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from segany.automatic.generator import describe_filter_counts
from segany.errors import SegAnyError
from segany.io.images import decode_image
from segany.modeling.sam import Sam
from segany.serve.annotations import dataset_folder, save_annotations
from segany.serve.cache import ByteLRU, CropEmbeddings, ImageEntry, LogitsStore
from segany.serve.engine import ServedModel, mask_record
from segany.serve.limits import BodySizeLimit, image_header, read_upload
from segany.serve.schemas import IMAGE_ID_PATTERN, AnnotationRequest, EverythingRequest, PredictRequest
from segany.utils.masks import keep_parts_touching_box
from segany.zoom_in import CropEmbedding

STATIC_DIR = Path(__file__).parent / "static"
STATIC_FILES = {"index.html": "text/html", "app.js": "text/javascript", "style.css": "text/css"}
#: onnxruntime-web files the page may load (the wasm runtime and its loader scripts).
ORT_FILE = re.compile(r"^ort[\w.-]*\.(m?js|wasm)$")
#: Swagger UI files /docs loads (served from the npm package, so the docs work offline).
SWAGGER_FILES = {"swagger-ui-bundle.js": "text/javascript", "swagger-ui.css": "text/css",
                 "favicon-32x32.png": "image/png"}
EMBEDDING_HEADERS = ["X-Embedding-Shape", "X-Embedding-Dtype", "X-Image-Size", "X-Input-Size"]
MB = 1024 * 1024


def ort_web_dir() -> Path:
    """Where onnxruntime-web's ``dist`` folder is: ``$SEGANY_ORT_WEB_DIR``, else the npm install that
    ``scripts/setup.sh`` makes next to the page (git-ignored)."""
    env = os.environ.get("SEGANY_ORT_WEB_DIR")
    return Path(env) if env else STATIC_DIR / "node_modules" / "onnxruntime-web" / "dist"


def swagger_dir() -> Path:
    return STATIC_DIR / "node_modules" / "swagger-ui-dist"


@dataclass
class ServerSettings:
    """Limits and options of one server (the ``segany serve`` flags)."""

    cache_mb: float = 1024
    max_upload_mb: float = 25
    max_pixels: int = 50_000_000
    dataset_dir: Path | None = None
    cors_origins: list[str] = field(default_factory=list)


def create_app(model: Sam, settings: ServerSettings | None = None, model_name: str = "model") -> FastAPI:
    """The FastAPI application serving ``model`` (see the module docstring for the endpoints)."""
    s = settings or ServerSettings()
    served = ServedModel(model, model_name)
    # One budget: 3/4 for the images and their embeddings, 1/8 for the refinement logits, 1/8 for zoom-in's
    # crop embeddings.
    budget = max(16, int(s.cache_mb * MB))
    logits = LogitsStore(budget // 8)
    crops: ByteLRU[CropEmbedding] = ByteLRU(budget // 8)
    cache: ByteLRU[ImageEntry] = ByteLRU(budget - 2 * (budget // 8))
    max_upload = int(s.max_upload_mb * MB)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        served.close()

    # /docs is defined below, on the local Swagger UI files when npm installed them (no CDN offline).
    app = FastAPI(title="segany", version="0.1.0", description=__doc__, docs_url=None, redoc_url=None,
                  lifespan=lifespan)
    app.state.served, app.state.cache, app.state.logits, app.state.settings = served, cache, logits, s
    # JSON bodies are small; only uploads and annotation saves approach the upload cap.
    app.add_middleware(BodySizeLimit, max_bytes=max_upload + 64 * 1024)
    if s.cors_origins:  # closed by default: the page is served from the same origin
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(s.cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Content-Type"], expose_headers=EMBEDDING_HEADERS)

    @app.exception_handler(RequestValidationError)
    async def _invalid_request(_request: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's default echoes the offending input back, and a non-finite number in it
        # (JSON "Infinity") makes that 422 response itself fail with a 500: report without inputs.
        errors = [{k: v for k, v in e.items() if k in ("loc", "msg", "type")} for e in exc.errors()]
        return JSONResponse({"detail": jsonable_encoder(errors)}, status_code=422)

    @app.exception_handler(SegAnyError)
    async def _bad_input(_request: Request, exc: SegAnyError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=400)

    def entry_of(image_id: str) -> ImageEntry:
        entry = cache.get(image_id)
        if entry is None:
            raise HTTPException(404, f"unknown image id {image_id[:16]}...; upload the image (again)")
        return entry

    ImageId = PathParam(pattern=IMAGE_ID_PATTERN, description="sha256 of the uploaded bytes")

    def ingest(data: bytes, image_id: str, ext: str) -> ImageEntry:
        image = decode_image(data, name="upload", max_pixels=s.max_pixels)
        embedding, input_size, text_features, decoder_inputs, refiner_image = served.embed(image)
        h, w = image.shape[:2]
        entry = ImageEntry(
            image_id, data, ext, h, w, input_size, embedding, text_features, decoder_inputs, refiner_image
        )
        cache.put(image_id, entry, entry.nbytes)
        return entry

    upload_body = {"requestBody": {"required": True, "content": {
        "multipart/form-data": {"schema": {"type": "object", "properties": {
            "file": {"type": "string", "format": "binary"}}, "required": ["file"]}},
        "image/*": {"schema": {"type": "string", "format": "binary"}},
    }}}

    @app.post("/api/images", openapi_extra=upload_body, summary="Upload an image; compute its embedding once")
    async def upload(request: Request) -> dict[str, Any]:
        data, _name = await read_upload(request, max_upload)
        header = image_header(data)
        if header is not None and header[0] * header[1] > s.max_pixels:
            raise HTTPException(
                413, f"the image is {header[0]}x{header[1]} = {header[0] * header[1]:,} pixels, "
                f"more than the limit of {s.max_pixels:,}"
            )
        image_id = hashlib.sha256(data).hexdigest()
        entry = cache.get(image_id)
        cached = entry is not None
        if entry is None:
            entry = await run_in_threadpool(ingest, data, image_id, header[2] if header else ".img")
        return {"image_id": image_id, "width": entry.width, "height": entry.height, "cached": cached}

    @app.post("/api/images/{image_id}/predict", summary="Masks from points / a box / earlier logits")
    def predict(req: PredictRequest, image_id: str = ImageId) -> dict[str, Any]:
        entry = entry_of(image_id)
        if len(req.points) != len(req.labels):
            raise HTTPException(400, f"{len(req.points)} points but {len(req.labels)} labels")
        if any(lab not in (0, 1) for lab in req.labels):
            raise HTTPException(400, "labels must be 1 (positive) or 0 (negative)")
        if not req.points and req.box is None and req.text is None:
            raise HTTPException(400, "give at least one point, a box or a text")
        if req.instances is not None:
            if req.text is None or req.points or req.box is not None or req.mask_input is not None:
                raise HTTPException(400, "instances goes with a text alone (no points, box or mask_input)")
            inst, inst_scores = served.predict_instances(entry, req.text, req.instances)
            return {"image_id": image_id, "width": entry.width, "height": entry.height,
                    "masks": [mask_record(m, float(sc), req.format) for m, sc in zip(inst, inst_scores)]}
        mask_input, previous_crop = None, None
        if req.mask_input is not None:
            stored = logits.get(image_id, req.mask_input)
            if stored is None:
                raise HTTPException(404, f"unknown or expired logits handle {req.mask_input!r}")
            mask_input, previous_crop = stored[0][None], stored[1]
        if req.text is not None and (req.zoom_in or previous_crop is not None):
            raise HTTPException(400, "a text prompt is answered on the whole image: leave out zoom_in "
                                     "(and a mask_input predicted with it)")
        points = np.array(req.points, dtype=np.float64) if req.points else None
        labels = np.array(req.labels, dtype=np.int64) if req.points else None
        box = np.array(req.box, dtype=np.float64) if req.box is not None else None
        crop = None
        if req.zoom_in:
            masks, scores, low_res, crop = served.predict_zoomed(
                entry, lambda: decode_image(entry.data, name="upload", max_pixels=s.max_pixels),
                CropEmbeddings(crops, image_id), points, labels, box, mask_input, previous_crop, req.multimask,
            )
            crop = None if crop == (0, 0, entry.width, entry.height) else crop
        else:
            if previous_crop is not None:  # a zoomed mask_input is in its crop's frame
                mask_input = served.whole_image_mask_input(entry, mask_input, previous_crop)
            masks, scores, low_res = served.predict(entry, points, labels, box, mask_input, req.multimask, req.text)
        out = []
        for m, sc, lr in zip(masks, scores, low_res):
            if box is not None:  # specks wholly outside the box are not the object (as `segany segment`)
                m = keep_parts_touching_box(m, box)
            rec = mask_record(m, float(sc), req.format)
            rec["logits"] = logits.add(image_id, lr, crop)
            rec["crop"] = None if crop is None else list(crop)  # zoom-in: the crop it was predicted on
            out.append(rec)
        return {"image_id": image_id, "width": entry.width, "height": entry.height, "masks": out}

    @app.post("/api/images/{image_id}/everything", summary="Segment everything (automatic masks)")
    def everything(req: EverythingRequest, image_id: str = ImageId) -> dict[str, Any]:
        entry = entry_of(image_id)
        image = decode_image(entry.data, name="upload", max_pixels=s.max_pixels)
        options = req.model_dump(exclude={"max_masks"})
        records, counts = served.everything(entry, image, options)
        records.sort(key=lambda r: -r["area"])  # large first: drawn in order, small masks stay visible
        masks = [
            {k: r[k] for k in ("segmentation", "area", "bbox", "predicted_iou", "stability_score", "point_coords")}
            for r in records[: req.max_masks]
        ]
        # What each filter removed, so that "0 masks" comes with its reason.
        return {"image_id": image_id, "width": entry.width, "height": entry.height, "masks": masks,
                "total": len(records), "filters": counts, "summary": describe_filter_counts(counts)}

    @app.get("/api/images/{image_id}/embedding", summary="The image embedding, raw little-endian floats",
             response_class=Response)
    def embedding(
        image_id: str = ImageId, dtype: Literal["float32", "float16"] = "float32", part: str = "image_embeddings"
    ) -> Response:
        entry = entry_of(image_id)
        tensor = served.onnx_image_input(entry, part)  # SAM 2: high_res_feats_0 / _1; SAM-HQ: hq_features
        if tensor is None:
            raise HTTPException(404, f"this model's decoder has no image input {part[:40]!r}")
        arr = tensor.numpy().astype("<f4" if dtype == "float32" else "<f2")
        headers = {
            "X-Embedding-Shape": ",".join(str(d) for d in arr.shape),
            "X-Embedding-Dtype": dtype,
            "X-Image-Size": f"{entry.height},{entry.width}",
            "X-Input-Size": f"{entry.input_size[0]},{entry.input_size[1]}",
            "Cache-Control": "private, max-age=3600",
        }
        return Response(arr.tobytes(), media_type="application/octet-stream", headers=headers)

    @app.get("/api/decoder.onnx", summary="The ONNX prompt decoder of the served model", response_class=Response)
    def decoder(first_prompt_only: bool = False) -> Response:
        """``first_prompt_only``: a model's correction decoder left out (the page's graph: it sends no mask)."""
        try:
            data = served.decoder_onnx(first_prompt_only)
        except SegAnyError as e:  # the onnx package is missing: the server works, the browser decoder not
            raise HTTPException(503, str(e)) from None
        etag = hashlib.sha256(data).hexdigest()[:32]
        return Response(data, media_type="application/octet-stream", headers={"ETag": f'"{etag}"'})

    @app.get("/api/info", summary="The served model's input size, embedding shape and threshold")
    def info() -> dict[str, Any]:
        return served.info() | {
            "annotation_mode": s.dataset_dir is not None,
            "cache": {"images": len(cache), "bytes": cache.nbytes, "max_bytes": cache.max_bytes,
                      "logits_bytes": logits.nbytes, "logits_max_bytes": logits.max_bytes,
                      "crop_bytes": crops.nbytes, "crop_max_bytes": crops.max_bytes},
            "ort_web": (ort_web_dir() / "ort.wasm.min.js").is_file(),
        }

    @app.post("/api/datasets/{name}/annotations", summary="Save accepted masks as SA-1B JSON (annotation mode)")
    def annotations(name: str, req: AnnotationRequest) -> dict[str, Any]:
        if s.dataset_dir is None:
            raise HTTPException(403, "annotation mode is off: start the server with --dataset-dir DIR")
        dataset_folder(Path(s.dataset_dir), name)  # refuse a bad name before anything else
        entry = entry_of(req.image_id)
        records = [m.model_dump(exclude_none=True) for m in req.masks]
        for r in records:
            r["segmentation"] = {"size": list(r["segmentation"]["size"]), "counts": r["segmentation"]["counts"]}
        return save_annotations(Path(s.dataset_dir), name, entry, records)

    @app.get("/docs", include_in_schema=False)
    def docs() -> Response:
        from fastapi.openapi.docs import get_swagger_ui_html

        local = (swagger_dir() / "swagger-ui-bundle.js").is_file()
        urls = {"swagger_js_url": "/vendor/swagger/swagger-ui-bundle.js",
                "swagger_css_url": "/vendor/swagger/swagger-ui.css",
                "swagger_favicon_url": "/vendor/swagger/favicon-32x32.png"} if local else {}
        return get_swagger_ui_html(openapi_url=app.openapi_url, title="segany API", **urls)

    @app.get("/vendor/swagger/{name}", include_in_schema=False)
    def swagger_file(name: str) -> FileResponse:
        if name not in SWAGGER_FILES or not (swagger_dir() / name).is_file():
            raise HTTPException(404, f"{name} not found: install swagger-ui-dist with scripts/setup.sh")
        return FileResponse(swagger_dir() / name, media_type=SWAGGER_FILES[name])

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    @app.get("/static/{name}", include_in_schema=False)
    def static(name: str) -> FileResponse:
        if name not in STATIC_FILES:
            raise HTTPException(404, "not found")
        return FileResponse(STATIC_DIR / name, media_type=STATIC_FILES[name])

    @app.get("/vendor/ort/{name}", include_in_schema=False)
    def ort_file(name: str) -> FileResponse:
        path = ort_web_dir() / name
        if not ORT_FILE.fullmatch(name) or not path.is_file():
            raise HTTPException(404, f"{name} not found: install onnxruntime-web with scripts/setup.sh")
        media = "application/wasm" if name.endswith(".wasm") else "text/javascript"
        return FileResponse(path, media_type=media)

    return app
