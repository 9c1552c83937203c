"""The optional API key: ``Authorization: Bearer KEY`` (what the openai client sends), compared in constant time."""

from __future__ import annotations

import hmac
import json
from typing import Callable, Optional

#: paths open without a key: the health probe, and the page (static HTML; everything it calls needs the key)
OPEN_PATHS = ("/healthz", "/")


def authorized(header: Optional[str], key: Optional[str]) -> bool:
    """Whether an ``Authorization`` header carries ``key`` (always true when no key is set)."""
    if not key:
        return True
    scheme, _, given = (header or "").partition(" ")
    if scheme.lower() != "bearer":
        given = ""
    return hmac.compare_digest(given.strip().encode("utf-8"), key.encode("utf-8"))


def needs_key(path: str, route_prefix: str = "/") -> bool:
    """Whether ``path`` (as the ingress sees it, after Serve's route prefix) needs the key."""
    prefix = route_prefix.rstrip("/")
    if prefix and path.startswith(prefix):
        path = path[len(prefix):] or "/"
    return path not in OPEN_PATHS


class BearerAuth:
    """ASGI middleware: 401 in OpenAI's error shape for a request without the key (a raw ASGI wrapper,
    not ``BaseHTTPMiddleware``, so streamed responses and client disconnects pass through untouched)."""

    def __init__(self, app, key: Callable[[], Optional[str]], route_prefix: Callable[[], str] = lambda: "/"):
        self.app, self.key, self.route_prefix = app, key, route_prefix

    async def __call__(self, scope, receive, send) -> None:
        key = self.key()
        if scope["type"] != "http" or not key or not needs_key(scope.get("path", "/"), self.route_prefix()):
            await self.app(scope, receive, send)
            return
        header = next((v.decode("latin-1") for k, v in scope.get("headers", ()) if k == b"authorization"), None)
        if authorized(header, key):
            await self.app(scope, receive, send)
            return
        from .openai_api import error_body

        message = ("missing or wrong API key: send 'Authorization: Bearer KEY' with the key the server was "
                   "started with (--api-key or STARFLOW_API_KEY)")
        body = json.dumps(error_body(message, "authorization", "invalid_api_key")).encode("utf-8")
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", b"application/json"), (b"www-authenticate", b"Bearer"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
