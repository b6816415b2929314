"""What a request passes before the app reads it: the API key (401), then the body's size (413)."""
from __future__ import annotations

import hmac

from jaxgpt.serving import protocol

MAX_REQUEST_BYTES = 1 << 20  # request bodies above this get a 413, unread: a prompt of ~1M characters fits
OPEN_PATHS = ("/healthz", "/")  # served without the key: a supervisor's probe, and the page (it asks for the key)


class KeyAndBodyLimit:
    """ASGI middleware in front of the app: the API key, checked before anything of the request is read (401), then
    the body's size, checked before it is parsed (413), whether the client declared a Content-Length or sent
    chunks. Keys are compared in constant time and never logged."""

    def __init__(self, app, api_key: str | None, max_bytes: int):
        self.app, self.key, self.max_bytes = app, api_key.encode() if api_key else None, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])  # lower-case names
        if self.key and scope["path"] not in OPEN_PATHS and not self.authorized(headers.get(b"authorization")):
            missing = b"authorization" not in headers
            message = ("this server needs an API key: send the header `Authorization: Bearer KEY`" if missing
                       else "incorrect API key (expected `Authorization: Bearer KEY`)")
            return await protocol.error(401, message, kind="invalid_request_error", code="invalid_api_key",
                                        headers={"WWW-Authenticate": "Bearer"})(scope, receive, send)
        declared = headers.get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            return await self.too_large(scope, receive, send)
        if scope["method"] in ("POST", "PUT", "PATCH"):
            body, more = bytearray(), True
            while more:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                body += message.get("body", b"")
                more = message.get("more_body", False)
                if len(body) > self.max_bytes:
                    return await self.too_large(scope, receive, send)
            receive = _replay(bytes(body), receive)
        await self.app(scope, receive, send)

    def authorized(self, header: bytes | None) -> bool:
        scheme, _, token = (header or b"").partition(b" ")
        return hmac.compare_digest(token.strip(), self.key) and scheme.lower() == b"bearer"

    async def too_large(self, scope, receive, send):
        await protocol.error(413, f"the request body exceeds this server's limit of {self.max_bytes} bytes",
                             headers={"Connection": "close"})(scope, receive, send)


def _replay(body: bytes, receive):
    """An ASGI receive that gives the body already read, then the client's later messages (a disconnect)."""
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()
    return replay
