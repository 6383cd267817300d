"""
``POST /publish``: producers without Redis access publish over HTTP.

The body is one envelope ``{"content": ..., "channel"?: str, "user"?: str}``
or a non-empty JSON array of them, strict JSON (L{pushservice.strictjson}).
It is allowed only with ``Authorization: Bearer <jwt>`` whose ``publish``
claim covers every channel it names (a broadcast, no channel: the entry
``*``; ``private:`` channels: a ``private:`` pattern), whatever
--client-publish says (that option is about WebSocket clients). All the
items go out in one LPUSH onto the queue, in body order: they join the same
ordered log as every producer's items and pass the same ingest rules. The
answer is 202 once Redis stored them, 503 when it did not confirm within
--redis-timeout (they may still arrive: a retry can duplicate), and
400 / 401 / 403 / 413 with a JSON ``{"error", "message"}`` body for a bad
body, a missing or bad token, a channel not granted, an item over
--max-item-size; in those cases nothing is pushed. The router has already
bounded the body (--max-publish-body, refused unread) and refuses publishing
on a node without --token-secret-file (404).
"""

from __future__ import annotations

from typing import Any

from twisted.logger import Logger
from twisted.web import resource, server

from .auth import AuthError, Grant, Policy
from .ingest import check_user
from .session import Node
from .strictjson import StrictJSONError, dumps
from .wire import check_channel

__all__ = ["Publish"]

_FIELDS = frozenset(("content", "channel", "user"))
#: Who may publish here: a token's publish grant, whatever --client-publish says.
_POLICY = Policy("token")


class _Refused(Exception):
    """A request that cannot be served: its status, error code and sentence."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def _item(value: object, position: str, max_size: int) -> tuple[bytes, str | None]:
    """The item to LPUSH for one envelope of the body, and its channel. @raise _Refused: 400 or 413."""
    if not isinstance(value, dict):
        raise _Refused(400, "bad_request", f"{position} is not a JSON object")
    unknown = sorted(set(value) - _FIELDS)
    if unknown:
        raise _Refused(400, "bad_request", f"{position} has unknown members {unknown}: use content, channel, user")
    if "content" not in value:
        raise _Refused(400, "bad_request", f'{position} has no "content"')
    try:
        channel = None if value.get("channel") is None else check_channel(value["channel"])
        user = None if value.get("user") is None else check_user(value["user"])
    except ValueError as e:
        raise _Refused(400, "bad_request", f"{position}: {e}") from None
    envelope: dict[str, Any] = {"content": value["content"]}
    if channel is not None:
        envelope["channel"] = channel
    if user is not None:
        envelope["user"] = user
    item = dumps(envelope)
    if len(item) > max_size:
        raise _Refused(413, "too_large", f"{position} is {len(item)} bytes, over --max-item-size ({max_size})")
    return item, channel


class Publish(resource.Resource):
    """The ``/publish`` resource: checks a request, LPUSHes its items, answers when Redis did."""

    isLeaf = True
    _log = Logger()

    def __init__(self, node: Node) -> None:
        super().__init__()
        self._node = node

    def render_POST(self, request: Any) -> Any:
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"no-store")
        try:
            grant = self._grant(request)
            items = self._items(request.content.read())
            for _, channel in items:
                if not _POLICY.may_publish(grant, channel):
                    where = "broadcast (a publish grant of '*')" if channel is None else f"publish on {channel!r}"
                    raise _Refused(403, "forbidden", f"this token is not allowed to {where}")
        except _Refused as e:
            self._node.stats.http_refusals[str(e.status)] += 1
            if e.status == 401:
                request.setHeader(b"www-authenticate", b'Bearer realm="pushservice"')
            return self._answer(request, e.status, {"error": e.code, "message": e.message})
        gone: list[bool] = []
        request.notifyFinish().addErrback(lambda _: gone.append(True))

        def stored(_: object) -> None:
            self._node.stats.http_publishes += len(items)
            if not gone:
                request.write(self._answer(request, 202, {"queued": len(items)}))
                request.finish()

        def unavailable(failure: Any) -> None:
            self._log.info("POST /publish: Redis did not confirm: {why}", why=failure.getErrorMessage())
            self._node.stats.errors["unavailable"] += 1
            if not gone:
                message = "Redis did not confirm the items; they may or may not be delivered"
                request.write(self._answer(request, 503, {"error": "unavailable", "message": message}))
                request.finish()

        self._node.bus.publish(*(item for item, _ in items)).addCallbacks(stored, unavailable)
        return server.NOT_DONE_YET

    def render_GET(self, request: Any) -> bytes:
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"allow", b"POST")
        body = {"error": "method_not_allowed", "message": "POST envelopes here (see README: Publishing over HTTP)"}
        return self._answer(request, 405, body)

    render_HEAD = render_GET

    def _grant(self, request: Any) -> Grant:
        header = request.getHeader(b"authorization")
        if header is None:
            raise _Refused(401, "unauthorized", "send a token: Authorization: Bearer <jwt> with a publish grant")
        scheme, _, token = header.decode("latin-1").strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise _Refused(401, "unauthorized", "the Authorization header is not 'Bearer <jwt>'")
        try:
            return self._node.verify(token.strip())  # type: ignore[no-any-return]
        except AuthError as e:
            raise _Refused(401, "unauthorized", str(e)) from None

    def _items(self, body: bytes) -> list[tuple[bytes, str | None]]:
        try:
            value = self._node.rules.loads(body.decode("utf-8"))
        except UnicodeDecodeError:
            raise _Refused(400, "bad_request", "the body is not UTF-8") from None
        except StrictJSONError as e:
            raise _Refused(400, "bad_request", f"the body is not strict JSON: {e}") from None
        max_size = self._node.config.max_item_size
        if not isinstance(value, list):
            return [_item(value, "the body", max_size)]
        if not value:
            raise _Refused(400, "bad_request", "the array is empty: nothing to publish")
        return [_item(v, f"item {i}", max_size) for i, v in enumerate(value)]

    @staticmethod
    def _answer(request: Any, status: int, body: dict[str, Any]) -> bytes:
        data = dumps(body) + b"\n"
        request.setResponseCode(status)
        request.setHeader(b"content-length", b"%d" % len(data))
        return data
