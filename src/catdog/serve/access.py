"""Who may call the service, and which request each answer and log line belongs to.

`AccessMiddleware` is a plain ASGI middleware (it wraps `send`, so streaming and background work are untouched):
- every answer carries `X-Request-ID`: the caller's own when it is sane (a proxy's or a client's id, so a request
  can be followed across systems), else a new uuid4; the same id is on `request.state.request_id` and in the
  access log line written for each request (uvicorn's own access log is turned off in favour of this one);
- with an API key, every path but `OPEN_PATHS` needs `Authorization: Bearer <key>`, compared in constant time
  (`hmac.compare_digest`); otherwise 401 with the error body and `WWW-Authenticate: Bearer`. The page `/` is
  static and stays open so a browser can load it; its requests send the key.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import re
import time
import uuid

from catdog.serve.config import API_KEY_ENVIRONMENT_VARIABLE
from catdog.serve.schemas import UNAUTHORIZED_RESPONSE, ErrorBody

logger = logging.getLogger("catdog.serve.access")

OPEN_PATHS = frozenset({"/health", "/ready", "/"})
REQUEST_ID_HEADER = "x-request-id"
SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
BEARER_SCHEME_NAME = "apiKey"


class AccessMiddleware:
    def __init__(self, app, api_key: str = "", open_paths: frozenset[str] = OPEN_PATHS):
        self.app = app
        self.expected_authorization = f"Bearer {api_key}".encode() if api_key else None
        self.open_paths = open_paths

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = incoming_request_id(scope) or uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        started = time.perf_counter()
        status = 500  # what the client sees if the app raises before answering (the server then answers 500)

        async def send_with_request_id(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
            await send(message)

        try:
            if self.expected_authorization is not None and scope["path"] not in self.open_paths \
                    and not self.authorized(scope):
                await send_unauthorized(send_with_request_id)
            else:
                await self.app(scope, receive, send_with_request_id)
        finally:
            client = scope.get("client") or ("-", 0)
            logger.info('%s:%s "%s %s HTTP/%s" %d %.1f ms request_id=%s', client[0], client[1], scope["method"],
                        scope["path"], scope.get("http_version", "1.1"), status, 1000 * (time.perf_counter() - started),
                        request_id)

    def authorized(self, scope) -> bool:
        given = next((value for name, value in scope["headers"] if name == b"authorization"), b"")
        return hmac.compare_digest(given, self.expected_authorization)


def incoming_request_id(scope) -> str | None:
    for name, value in scope["headers"]:
        if name == REQUEST_ID_HEADER.encode():
            text = value.decode("latin-1")
            return text if SANE_REQUEST_ID.fullmatch(text) else None  # never echo arbitrary bytes into logs
    return None


async def send_unauthorized(send) -> None:
    body = ErrorBody(error="unauthorized", detail="send the header 'Authorization: Bearer <key>' (the server's API key)")
    payload = body.model_dump_json().encode()
    await send({"type": "http.response.start", "status": 401, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
        (b"www-authenticate", b"Bearer")]})
    await send({"type": "http.response.body", "body": payload})


def document_api_key(openapi: dict, open_paths: frozenset[str] = OPEN_PATHS) -> dict:
    """The OpenAPI schema of a server with a key: a bearer scheme, required (with its 401) on each protected operation."""
    components = openapi.setdefault("components", {})
    components.setdefault("securitySchemes", {})[BEARER_SCHEME_NAME] = {
        "type": "http", "scheme": "bearer", "description": f"the server's API key (--api-key or {API_KEY_ENVIRONMENT_VARIABLE})"}
    components.setdefault("schemas", {}).setdefault("ErrorBody", ErrorBody.model_json_schema())
    for path, operations in openapi.get("paths", {}).items():
        if path in open_paths:
            continue
        for operation in operations.values():
            operation["security"] = [{BEARER_SCHEME_NAME: []}]
            operation.setdefault("responses", {})["401"] = {
                "description": UNAUTHORIZED_RESPONSE["description"],
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}}
    return openapi


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: only localhost is known to stay on this machine
        return False
