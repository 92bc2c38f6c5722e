"""The HTTP side of `unison serve`: OpenAI's Videos API and the status page, on Starlette.

    POST   /v1/videos                       create (multipart, as the `openai` client sends, or JSON)
    GET    /v1/videos                       list: ?after=ID&limit=N&order=asc|desc (newest first)
    GET    /v1/videos/{id}                  retrieve
    DELETE /v1/videos/{id}                  delete (a running job stops at its next step)
    GET    /v1/videos/{id}/content          the mp4; ?variant=thumbnail (JPEG) or spritesheet (JPEG)
    GET    /                                the status page (no build step; it polls the API)
    GET    /healthz                         the engines' state and the job counts (no token needed)

Every error is one JSON object, `{"error": {"message", "type", "param", "code"}}`, with the status
a client expects: 400 a bad field, 401 a missing or wrong token, 404 no such video or path, 405,
409 content asked of a video that is not completed, 413 a body or picture too large, 429 past a
queue limit (with Retry-After), 503 while shutting down. The request handlers run the service's
blocking work (validation, fsync) in Starlette's thread pool.
"""

from __future__ import annotations

import hmac
import json
import re
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from unison.launch.serve.requests import BadRequest, parse_create
from unison.launch.serve.service import Service, video_object
from unison.launch.serve.store import ID

PAGE = Path(__file__).with_name("page.html")
POLL_MS = 500
"""What `openai-poll-after-ms` tells a polling client (the `openai` client's poll() reads it)."""


def error_response(err: BadRequest) -> JSONResponse:
    headers = {"Retry-After": "5"} if err.status == 429 else None
    if err.status == 401:
        headers = {"WWW-Authenticate": "Bearer"}
    return JSONResponse({"error": {"message": err.message, "type": err.type, "param": err.param, "code": err.code}},
                        status_code=err.status, headers=headers)


class BodyLimit:
    """ASGI middleware: a request body past `limit` bytes is refused with 413, from its
    Content-Length before anything is read, or as soon as the bytes read pass it."""

    def __init__(self, app, *, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_large = BadRequest(f"the request body is larger than this server takes ({self.limit} bytes)",
                               status=413, code="request_too_large")
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await error_response(too_large)(scope, receive, send)
        seen = 0
        started = False

        async def counted():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _TooLarge()
            return message

        async def tracked_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counted, tracked_send)
        except _TooLarge:
            if not started:
                await error_response(too_large)(scope, receive, send)


class _TooLarge(Exception):
    pass


def unflatten(items: list[tuple[str, Any]]) -> dict[str, Any]:
    """A form's fields as the `openai` client writes nested values (`cache[kind]=x`, `lora[]=a`)
    -> a mapping of plain values, lists and one level of mappings."""
    out: dict[str, Any] = {}
    for key, value in items:
        match = re.fullmatch(r"([A-Za-z_0-9]+)\[([A-Za-z_0-9]*)\]", key)
        if match is None:
            if key in out:
                raise BadRequest(f"'{key[:60]}' given twice", param=key[:60])
            out[key] = value
            continue
        name, sub = match.groups()
        if sub == "":
            current = out.setdefault(name, [])
            if not isinstance(current, list):
                raise BadRequest(f"'{name}' given twice", param=name)
            current.append(value)
        else:
            current = out.setdefault(name, {})
            if not isinstance(current, dict) or sub in current:
                raise BadRequest(f"'{name}' given twice", param=name)
            current[sub] = _plain(value)
    return out


def _plain(text: Any) -> Any:
    """A nested form value: a JSON scalar where it reads as one ("0.1", "true"), else the text."""
    if not isinstance(text, str):
        return text
    try:
        value = json.loads(text)
    except ValueError:
        return text
    return value if isinstance(value, (int, float, bool)) or value is None else text


def build_app(service: Service, *, token: str | None, lifespan=None) -> Starlette:
    """The app over `service`; `lifespan`: Starlette's, which starts and stops the engines."""
    limits = service.limits

    def client_of(request: Request) -> str:
        return request.client.host if request.client is not None else "unknown"

    def authorized(request: Request) -> None:
        if token is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, value = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), token.encode()):
            raise BadRequest("missing or wrong bearer token (Authorization: Bearer TOKEN)", status=401,
                             code="invalid_api_key", type="invalid_request_error")

    def tracked_or_404(video_id: str):
        tracked = service.get(video_id) if ID.fullmatch(video_id) else None
        if tracked is None:
            raise BadRequest(f"no video with id {video_id[:80]!r}", status=404, code="not_found", param="video_id")
        return tracked

    async def read_create(request: Request) -> tuple[dict[str, Any], bytes | None]:
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind in ("multipart/form-data", "application/x-www-form-urlencoded"):
            try:
                form = await request.form(max_files=1, max_fields=64, max_part_size=limits.max_upload_bytes)
            except HTTPException as err:  # a malformed form, or too many parts
                raise BadRequest(f"the form does not parse: {err.detail}") from None
            upload, items = None, []
            for key, value in form.multi_items():
                if isinstance(value, UploadFile):
                    if key != "input_reference":
                        raise BadRequest(f"a file is only taken as 'input_reference', not '{key[:60]}'", param=key[:60])
                    upload = await value.read()
                else:
                    items.append((key, value))
            await form.close()
            return unflatten(items), upload
        if kind == "application/json":
            try:
                body = json.loads(await request.body())
            except (ValueError, RecursionError):
                raise BadRequest("the body is not valid JSON") from None
            if not isinstance(body, dict):
                raise BadRequest("the body must be a JSON object")
            return body, None
        raise BadRequest("send multipart/form-data (the openai client's way) or application/json",
                         code="unsupported_media_type")

    async def create(request: Request) -> Response:
        authorized(request)
        fields, upload = await read_create(request)
        parsed = await run_in_threadpool(parse_create, fields, upload, service.served)
        tracked = await run_in_threadpool(service.create, parsed, client=client_of(request))
        return JSONResponse(video_object(service, tracked))

    async def listing(request: Request) -> Response:
        authorized(request)
        query = request.query_params
        unknown = sorted(set(query) - {"after", "limit", "order"})
        if unknown:
            raise BadRequest(f"unknown query parameter '{unknown[0][:60]}'", param=unknown[0][:60])
        try:
            limit = int(query.get("limit", "20"))
        except ValueError:
            raise BadRequest("'limit' must be a whole number", param="limit") from None
        if not 1 <= limit <= 100:
            raise BadRequest(f"'limit' must be between 1 and 100, got {limit}", param="limit")
        order = query.get("order", "desc")
        if order not in ("asc", "desc"):
            raise BadRequest(f"'order' must be asc or desc, got {order[:20]!r}", param="order")
        items, more = service.page(after=query.get("after"), limit=limit, order=order)
        data = [video_object(service, t) for t in items]
        return JSONResponse({"object": "list", "data": data, "has_more": more,
                             "first_id": data[0]["id"] if data else None, "last_id": data[-1]["id"] if data else None})

    async def retrieve(request: Request) -> Response:
        authorized(request)
        tracked = tracked_or_404(request.path_params["video_id"])
        return JSONResponse(video_object(service, tracked), headers={"openai-poll-after-ms": str(POLL_MS)})

    async def delete(request: Request) -> Response:
        authorized(request)
        video_id = request.path_params["video_id"]
        tracked_or_404(video_id)
        if not await run_in_threadpool(service.delete, video_id):
            raise BadRequest(f"no video with id {video_id[:80]!r}", status=404, code="not_found", param="video_id")
        return JSONResponse({"id": video_id, "object": "video.deleted", "deleted": True})

    async def content(request: Request) -> Response:
        authorized(request)
        video_id = request.path_params["video_id"]
        tracked = tracked_or_404(video_id)
        unknown = sorted(set(request.query_params) - {"variant"})
        if unknown:
            raise BadRequest(f"unknown query parameter '{unknown[0][:60]}'", param=unknown[0][:60])
        variant = request.query_params.get("variant", "video")
        if variant not in ("video", "thumbnail", "spritesheet"):
            raise BadRequest(f"'variant' must be video, thumbnail or spritesheet, got {variant[:30]!r}",
                             param="variant")
        if tracked.status != "completed":
            raise BadRequest(f"video {video_id} is {tracked.status}; its content is there once it is completed",
                             status=409, code="video_not_ready")
        store = service.store
        if variant == "video":
            path, media = store.video(video_id), "video/mp4"
        elif variant == "thumbnail":
            path, media = store.thumbnail(video_id), "image/jpeg"
            if not path.is_file():
                await run_in_threadpool(store.make_thumbnail, video_id)
        else:
            path, media = await run_in_threadpool(store.spritesheet, video_id), "image/jpeg"
        if path is None or not path.is_file():
            raise BadRequest(f"video {video_id}: its {variant} is missing from the store", status=404,
                             code="not_found")
        return FileResponse(path, media_type=media, filename=f"{video_id}{'.mp4' if variant == 'video' else '.jpg'}")

    async def page(request: Request) -> Response:
        return HTMLResponse(PAGE.read_text(encoding="utf-8"), headers={"Cache-Control": "no-store"})

    async def health(request: Request) -> Response:
        return JSONResponse({"engine": service.engine_state, "jobs": service.counts(), "model": service.served.model,
                             "token": token is not None})

    async def bad_request(request: Request, err: BadRequest) -> Response:
        return error_response(err)

    async def http_error(request: Request, err: HTTPException) -> Response:
        code = {404: "not_found", 405: "method_not_allowed"}.get(err.status_code, "http_error")
        return error_response(BadRequest(str(err.detail), status=err.status_code, code=code))

    routes = [
        Route("/", page, methods=["GET"]),
        Route("/healthz", health, methods=["GET"]),
        Route("/v1/videos", create, methods=["POST"]),
        Route("/v1/videos", listing, methods=["GET"]),
        Route("/v1/videos/{video_id}", retrieve, methods=["GET"]),
        Route("/v1/videos/{video_id}", delete, methods=["DELETE"]),
        Route("/v1/videos/{video_id}/content", content, methods=["GET"]),
    ]
    app = Starlette(routes=routes, exception_handlers={BadRequest: bad_request, HTTPException: http_error},
                    lifespan=lifespan)
    app.add_middleware(BodyLimit, limit=limits.max_upload_bytes)
    return app
