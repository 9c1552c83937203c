"""What a web page the user happens to visit cannot make the service do (an ASGI middleware; no Ray).

A page on another site can make the browser send a "simple" request without asking the service first
(CORS: a POST with a ``text/plain``, form or multipart body and only safelisted headers), and with DNS
rebinding (its own name resolving to 127.0.0.1) it can even read the answers. So, on every route:

* ``Host`` must name the bound address, or a name on ``allowed_hosts`` (``*``: any). Bound to a loopback
  address, ``localhost`` names it too; bound to every interface (``0.0.0.0``, ``::``), any IP literal and
  ``localhost`` do: rebinding needs a name, and an IP literal is none. Otherwise 400.
* A state-changing request (POST, PUT, PATCH, DELETE) with an ``Origin`` other than the server's own
  (the ``Host`` it was sent to) or one on ``allowed_origins`` gets 403.
* Without an allowed ``Origin``, a POST must be one no browser sends cross-site without a CORS preflight
  (which this service never grants): ``Content-Type: application/json`` (what the page sends), or any other
  body with an ``Authorization: Bearer`` or an ``X-...`` header (what the openai client's multipart create
  carries). Otherwise 415, naming both.
* Every answer carries ``X-Content-Type-Options: nosniff``.

The rules follow the Fetch standard's CORS-safelisted request headers and content types
(https://fetch.spec.whatwg.org/#cors-safelisted-request-header): a browser preflights any request outside
them, and a preflight here gets no ``Access-Control-Allow-*`` header, so the browser never sends it.
"""

from __future__ import annotations

import ipaddress
import json
from dataclasses import dataclass
from typing import Callable, Optional
from urllib.parse import urlsplit

STATE_CHANGING = ("POST", "PUT", "PATCH", "DELETE")
WILDCARD_BINDS = ("0.0.0.0", "::", "")
NOSNIFF = (b"x-content-type-options", b"nosniff")


def _ip(name: str) -> Optional[ipaddress._BaseAddress]:
    try:
        return ipaddress.ip_address(name)
    except ValueError:
        return None


def host_name(host_header: str) -> str:
    """``Host`` header → the lower-case name or address, without port or IPv6 brackets."""
    host = host_header.strip().lower()
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host[1:]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


@dataclass(frozen=True)
class BrowserPolicy:
    """The address the server is bound to and what else a request may name (see the module docstring)."""

    bound_host: str = "127.0.0.1"
    allowed_hosts: tuple[str, ...] = ()
    allowed_origins: tuple[str, ...] = ()

    def host_allowed(self, host_header: Optional[str]) -> bool:
        if host_header is None:
            return False
        if "*" in self.allowed_hosts:
            return True
        name = host_name(host_header)
        if name in (h.lower() for h in self.allowed_hosts) or name == host_name(self.bound_host):
            return True
        bound, ip = _ip(host_name(self.bound_host)), _ip(name)
        if self.bound_host in WILDCARD_BINDS:
            return ip is not None or name == "localhost"
        return name == "localhost" and bound is not None and bound.is_loopback

    def refusal(self, method: str, headers: dict[str, str]) -> Optional[tuple[int, str, str]]:
        """(status, param, message) when the request must be refused, else None; ``headers``: lower-case names."""
        if not self.host_allowed(headers.get("host")):
            shown = (headers.get("host") or "")[:100]
            return 400, "host", (f"Host {shown!r} does not name this server; send it to {self.bound_host} "
                                 "or start the server with --allowed-hosts NAME")
        if method not in STATE_CHANGING:
            return None
        origin = headers.get("origin")
        if origin is not None:
            if origin.rstrip("/") in (o.rstrip("/") for o in self.allowed_origins) or "*" in self.allowed_origins:
                return None
            if urlsplit(origin).netloc.lower() != headers.get("host", "").lower():
                return 403, "origin", (f"cross-origin request from {origin[:100]!r} refused; start the server "
                                       "with --allowed-origins ORIGIN to allow that site")
        if method != "POST" or _preflighted(headers):
            return None
        return 415, "content-type", ("send Content-Type: application/json, or a multipart form with an "
                                     "'Authorization: Bearer KEY' header (what a web page on another site "
                                     "cannot send)")


def _preflighted(headers: dict[str, str]) -> bool:
    """Whether a browser would have asked first: a non-simple content type or a header outside the safelist."""
    media = headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media == "application/json":
        return True
    bearer = headers.get("authorization", "").lower().startswith("bearer ")
    return bearer or any(name.startswith("x-") for name in headers)


class BrowserGuard:
    """ASGI middleware applying :class:`BrowserPolicy` (a raw ASGI wrapper like ``auth.BearerAuth``, so streamed
    answers pass through untouched); ``policy`` is read per request (the replica sets it after import)."""

    def __init__(self, app, policy: Callable[[], Optional[BrowserPolicy]]):
        self.app, self.policy = app, policy

    async def __call__(self, scope, receive, send) -> None:
        policy = self.policy()
        if scope["type"] != "http" or policy is None:
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", ())}
        refused = policy.refusal(scope.get("method", "GET"), headers)
        if refused is not None:
            from .openai_api import error_body

            status, param, message = refused
            body = json.dumps(error_body(message, param, "request_refused")).encode("utf-8")
            await send({"type": "http.response.start", "status": status,
                        "headers": [(b"content-type", b"application/json"), NOSNIFF,
                                    (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})
            return

        async def send_nosniff(message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()), NOSNIFF]}
            await send(message)

        await self.app(scope, receive, send_nosniff)
