"""
permessage-deflate (RFC 7692): what a client's offer is answered with, and
the compressed frames the server then sends it.

Outbound, every message is compressed on its own: nothing of one message is
referred to by the next (the server says ``server_no_context_takeover``).
So a message's compressed frame is the same bytes for every connection that
negotiated compression: it is made once, the first time such a connection
needs it (the fan-out of its batch, or a catch-up from history), and kept
on the message beside its plain frame. A batch is compressed with one
compressor, reset between messages (``Z_FULL_FLUSH``: no match reaches back
across it), so the cost of compression grows with messages, not with
connections. A message that would not get smaller goes plain (RSV1 clear),
as RFC 7692 allows; the frames pushservice writes itself (replies, errors)
go plain too.

Offers asking the server for a window under 32 KiB
(``server_max_window_bits`` < 15) are declined: the shared frames are
compressed with the full window. Every offer a browser, Python
``websockets`` or Node ``ws`` makes is accepted, and answered with
``client_no_context_takeover``, so nothing of a client's previous message
needs to be kept to read its next one (the inflater is released after each
message: see L{pushservice._internals}).

Inbound, Autobahn inflates client frames; it stops inflating as soon as a
message passes ``maxMessagePayloadSize`` (``--max-frame-size``) and closes
with 1009, so a zip bomb costs at most that many bytes.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable, Sequence
from typing import Any

from autobahn.websocket.compress import PerMessageDeflateOffer, PerMessageDeflateOfferAccept

from .logentry import Message

__all__ = ["LEVEL", "deflate_frame", "deflated", "deflated_join", "offer_accept"]

#: zlib's level: 6 (its default) made 2 KB of JSON ~8% smaller than level 1 did, for ~1.7x its CPU,
#: paid once per message, not per connection.
LEVEL = 6
#: zlib's default memLevel; its setup cost is paid once per batch (one compressor per batch).
_MEM_LEVEL = 8
#: A stored empty block: what a sync or full flush ends with, and what RFC 7692 leaves off the wire.
_TAIL = b"\x00\x00\xff\xff"


def _compressor() -> Any:
    return zlib.compressobj(LEVEL, zlib.DEFLATED, -zlib.MAX_WBITS, _MEM_LEVEL)


def _head(first: int, size: int) -> bytes:
    if size < 126:
        return bytes((first, size))
    if size < 65536:
        return struct.pack("!BBH", first, 126, size)
    return struct.pack("!BBQ", first, 127, size)


def deflate_frame(frame: bytes, compressor: Any | None = None) -> bytes:
    """
    The compressed form of one plain, unmasked, unfragmented server frame
    (as L{pushservice.wire.text_frame} builds them): the same opcode with
    RSV1 set and the payload deflated; C{frame} itself if that is not
    smaller. C{compressor}: a raw-deflate compressobj to reuse (it is left
    reset), else a fresh one is made.
    """
    length = frame[1] & 0x7F
    start = 2 if length < 126 else 4 if length == 126 else 10
    if compressor is None:
        compressor = _compressor()
    body = compressor.compress(frame[start:]) + compressor.flush(zlib.Z_FULL_FLUSH)
    if body.endswith(_TAIL):
        body = body[:-4]
    packed = _head(frame[0] | 0x40, len(body)) + body
    return packed if len(packed) < len(frame) else frame


def deflated(message: Message, compressor: Any | None = None) -> bytes:
    """C{message}'s frame for a compressing connection, made the first time it is asked for."""
    frame = message.deflated
    if frame is None:
        frame = deflate_frame(message.frame, compressor)
        # the one write to a frozen Message: a cache of a pure function of its frame
        object.__setattr__(message, "deflated", frame)
    return frame


def deflated_join(messages: Sequence[Message]) -> bytes:
    """The frames of C{messages} for a compressing connection, in order, as one write; one compressor for all."""
    if len(messages) == 1:
        return deflated(messages[0])
    compressor = None
    parts = []
    for message in messages:
        frame = message.deflated
        if frame is None:
            if compressor is None:
                compressor = _compressor()
            frame = deflated(message, compressor)
        parts.append(frame)
    return b"".join(parts)


class _Accept(PerMessageDeflateOfferAccept):  # type: ignore[misc]
    """Autobahn's answer, also saying ``server_no_context_takeover`` when the client did not ask for it."""

    def get_extension_string(self) -> str:
        text: str = super().get_extension_string()
        if "server_no_context_takeover" not in text:
            text = text.replace(self.EXTENSION_NAME, f"{self.EXTENSION_NAME}; server_no_context_takeover", 1)
        return text


def offer_accept(max_message_size: int) -> Callable[[list[Any]], PerMessageDeflateOfferAccept | None]:
    """
    Autobahn's C{perMessageCompressionAccept}: the first permessage-deflate
    offer the shared frames can serve, accepted; None (no compression) if
    there is none. C{max_message_size}: the inflated size at which a client
    message is refused (Autobahn also bounds it by maxMessagePayloadSize).
    """

    def accept(offers: list[Any]) -> PerMessageDeflateOfferAccept | None:
        for offer in offers:
            if isinstance(offer, PerMessageDeflateOffer) and offer.request_max_window_bits in (0, zlib.MAX_WBITS):
                return _Accept(
                    offer,
                    request_no_context_takeover=True,
                    no_context_takeover=True,  # also for Autobahn's own sendMessage, which pushservice does not use
                    max_message_size=max_message_size,
                )
        return None

    return accept
