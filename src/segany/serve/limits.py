"""Request limits: a body-size cap for every request, and reading an image upload within it.

The cap is enforced while the body streams in (a client can omit Content-Length or lie about it), so
an oversize request costs the server at most ``max_bytes`` of memory before it is answered with 413.
"""

from __future__ import annotations

import io
import json

from PIL import Image
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

#: Content types accepted for an upload (the bytes are still checked by decoding them).
IMAGE_TYPES = {
    "image/jpeg", "image/png", "image/webp", "image/bmp", "image/x-ms-bmp", "image/tiff", "image/gif",
    "application/octet-stream",  # browsers send this for a file whose type they do not know
}
#: Room for the multipart envelope (boundaries, part headers) on top of the file itself.
MULTIPART_SLACK = 64 * 1024


def too_large(max_bytes: int) -> HTTPException:
    return HTTPException(413, f"the request body is larger than the limit of {max_bytes:,} bytes")


class BodySizeLimit:
    """ASGI middleware: 413 for a declared Content-Length over the cap, and for a streamed body that
    grows past it. Raising starlette's ``HTTPException`` from ``receive`` lets FastAPI's own handlers
    render it as the usual ``{"detail": ...}`` JSON."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            body = json.dumps({"detail": too_large(self.max_bytes).detail}).encode()
            await send({"type": "http.response.start", "status": 413,
                        "headers": [(b"content-type", b"application/json"), (b"connection", b"close")]})
            await send({"type": "http.response.body", "body": body})
            return
        received = 0

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise too_large(self.max_bytes)
            return message

        await self.app(scope, limited, send)


def _media_type(header: str | None) -> str:
    return (header or "").split(";")[0].strip().lower()


async def read_upload(request: Request, max_bytes: int) -> tuple[bytes, str]:
    """The uploaded file's bytes and a name for messages, from a raw ``image/*`` body or a
    ``multipart/form-data`` body with a ``file`` field.

    Raises:
        HTTPException: 415 for another content type, 413 over ``max_bytes``, 400 for a form without a file.
    """
    ctype = _media_type(request.headers.get("content-type"))
    if ctype == "multipart/form-data":
        body = await _read_bounded(request, max_bytes + MULTIPART_SLACK)

        async def replay() -> Message:
            return {"type": "http.request", "body": body, "more_body": False}

        form = await Request(request.scope, replay).form(max_files=1, max_fields=4, max_part_size=1024)
        part = form.get("file")
        if part is None or isinstance(part, str):
            raise HTTPException(400, "the form has no 'file' field holding the image")
        if _media_type(part.content_type) not in IMAGE_TYPES:
            raise HTTPException(
                415, f"unsupported file type {part.content_type!r}; send a JPEG, PNG, WebP, BMP or TIFF"
            )
        data = await part.read()
        if len(data) > max_bytes:
            raise too_large(max_bytes)
        return data, part.filename or "upload"
    if ctype not in IMAGE_TYPES:
        shown = ctype or "none"
        raise HTTPException(
            415, f"unsupported content type {shown!r}; send the image bytes as image/jpeg, image/png, ... "
            "or as multipart/form-data with a 'file' field"
        )
    return await _read_bounded(request, max_bytes), "upload"


async def _read_bounded(request: Request, max_bytes: int) -> bytes:
    buf = bytearray()
    async for chunk in request.stream():
        buf += chunk
        if len(buf) > max_bytes:
            raise too_large(max_bytes)
    return bytes(buf)


def image_header(data: bytes) -> tuple[int, int, str] | None:
    """``(width, height, suffix)`` from the image header without decoding pixels (None if unreadable):
    refuses a too-large image before any decoding, and names the file saved with annotations."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            fmt = (img.format or "").lower()
            w, h = img.size
    except Exception:  # noqa: BLE001 - any failure here is reported by decode_image afterwards
        return None
    suffix = {"jpeg": ".jpg", "png": ".png", "webp": ".webp", "bmp": ".bmp", "tiff": ".tif", "gif": ".gif"}
    return w, h, suffix.get(fmt, ".img")
