"""Unit tests of pushservice.wire: parsing, validation and encoding of client frames (no reactor, no Redis)."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pushservice.strictjson import JSONRules
from pushservice.wire import (
    MAX_CHANNEL,
    Auth,
    Publish,
    Subscribe,
    Unsubscribe,
    WireError,
    check_channel,
    encode,
    error_frame,
    format_offset,
    leading_id,
    message_payload,
    parse_offset,
    parse_request,
    reply_frame,
    text_frame,
)

LIMIT = 64 * 1024
RULES = JSONRules(max_depth=64, max_number=100)


def parse(frame: object, limit: int = LIMIT) -> object:
    payload = frame if isinstance(frame, bytes) else json.dumps(frame).encode()
    return parse_request(payload, False, limit, RULES)


def bad(frame: object, code: str = "bad_request", limit: int = LIMIT, binary: bool = False) -> WireError:
    payload = frame if isinstance(frame, bytes) else json.dumps(frame).encode()
    with pytest.raises(WireError) as info:
        parse_request(payload, binary, limit, RULES)
    assert info.value.code == code, (frame, info.value.code, info.value.message)
    assert isinstance(info.value.message, str) and info.value.message
    return info.value


# -- each request type ---------------------------------------------------------


def test_publish_parsed():
    """A message frame becomes a Publish with its id, content and channel."""
    assert parse({"type": "message", "content": {"a": [1, None]}, "channel": "news", "id": 7}) == Publish(
        7, {"a": [1, None]}, "news"
    )


def test_publish_broadcast_and_null_content():
    """A message without channel (or channel null) is a broadcast; content may be null."""
    assert parse({"type": "message", "content": None}) == Publish(None, None, None)
    assert parse({"type": "message", "content": "x", "channel": None, "id": "r1"}) == Publish("r1", "x", None)


def test_subscribe_parsed():
    """A subscribe frame becomes a Subscribe, with since parsed to an offset tuple."""
    assert parse({"type": "subscribe", "channel": "news"}) == Subscribe(None, "news", None)
    assert parse({"type": "subscribe", "channel": "news", "since": "1700000000000-3", "id": "s"}) == Subscribe(
        "s", "news", (1700000000000, 3)
    )


def test_unsubscribe_parsed():
    """An unsubscribe frame becomes an Unsubscribe."""
    assert parse({"type": "unsubscribe", "channel": "news", "id": 0}) == Unsubscribe(0, "news")


def test_auth_parsed():
    """An auth frame becomes an Auth carrying its token."""
    assert parse({"type": "auth", "token": "abc.def.ghi", "id": 1}) == Auth(1, "abc.def.ghi")


def test_unicode_channel_of_max_bytes_accepted():
    """A channel of exactly 255 UTF-8 bytes (multi-byte characters) is accepted."""
    name = "é" * (MAX_CHANNEL // 2) + "x"  # 2*127 + 1 = 255 bytes
    assert len(name.encode()) == MAX_CHANNEL
    assert parse({"type": "subscribe", "channel": name}).channel == name


# -- bad input -------------------------------------------------------------------


@pytest.mark.parametrize(
    "payload",
    [b"", b"not json", b"{", b'{"type":"subscribe",}', b"\xff\xfe\x00", b"[1,2", b"{'type':'message'}", b"1" * 5000],
)
def test_not_json_is_bad_request(payload):
    """A frame that is not JSON is a bad_request without id."""
    assert bad(payload).request_id is None


@pytest.mark.parametrize("value", [[], [{"type": "message"}], "message", 3, 1.5, None, True])
def test_not_an_object_is_bad_request(value):
    """A JSON value that is not an object is a bad_request."""
    bad(value)


def test_nan_and_infinity_are_not_json():
    """NaN / Infinity, and numbers that overflow a double (1e999), are bad_request: browsers cannot parse them."""
    for payload in (
        b'{"type":"message","content":NaN}',
        b'{"type":"message","content":[Infinity]}',
        b'{"type":"message","content":-Infinity,"id":3}',
        b'{"type":"message","content":1e999}',
        b'{"type":"message","content":[-1e999]}',
        b'{"type":"message","content":1e400,"id":4}',
    ):
        bad(payload)


def test_depth_limit_is_explicit():
    """64 levels (counting the frame itself) are accepted, 65 are a bad_request, whatever the interpreter."""
    ok = b'{"type":"message","content":' + b"[" * 63 + b"]" * 63 + b"}"
    assert parse(ok).content is not None
    err = bad(b'{"id":5,"type":"message","content":' + b"[" * 64 + b"]" * 64 + b"}")
    assert err.request_id == 5 and "nested deeper than 64" in err.message
    bad(b'{"type":"message","content":' + b"[" * 100000 + b"]" * 100000 + b"}", limit=10**6)


def test_numbers_are_bounded_in_length():
    """A number longer than 100 characters is a bad_request (Python's int limit never comes into play)."""
    assert parse(b'{"type":"message","content":' + b"9" * 100 + b"}").content == int("9" * 100)
    bad(b'{"type":"message","content":' + b"9" * 101 + b"}")
    bad(b'{"type":"message","content":' + b"1" * 5000 + b"}")


@pytest.mark.parametrize(
    "payload",
    [
        b'{"type":"message","content":"a\tb"}'.replace(b"\\t", b"\t"),
        b'{"type":"message","content":"tab\there"}'.replace(b"\\t", b"\t"),
        b'{"type":"message","content":007}',
        b'{"type":"message","content":+1}',
        b'{"type":"message","content":.5}',
        b'{"type":"message","content":1.}',
        b'{"type":"message","content":0x10}',
        b'{"type":"message","content":1} x',
        b'{"type":"message","content":1}\x00',
        b'{"type":"message","type":"subscribe","channel":"a"}',
        b'\xef\xbb\xbf{"type":"message","content":1}',
    ],
)
def test_sloppy_json_is_bad_request(payload):
    """Raw control characters, leading zeros, signs, bare dots, hex, trailing bytes, duplicate names, BOM: refused."""
    bad(payload)


def test_glob_characters_are_not_channel_names():
    """Channel names with * ? [ ] are refused, so a name can never widen a token's grant pattern."""
    for name in ("news*", "a?b", "[x]", "private:*", "]"):
        bad({"type": "subscribe", "channel": name, "id": 1})
        with pytest.raises(ValueError):
            check_channel(name)


def test_missing_type_carries_id():
    """A frame without type is a bad_request that carries the frame's id."""
    assert bad({"id": "r9", "channel": "x"}).request_id == "r9"


@pytest.mark.parametrize("kind", ["publish", "", "MESSAGE", 1, None, ["message"], {"t": 1}, True])
def test_unknown_type_carries_id(kind):
    """An unknown (or non-string) type is a bad_request that carries the frame's id."""
    assert bad({"type": kind, "id": 42, "channel": "x", "content": 1}).request_id == 42


@pytest.mark.parametrize("channel", [1, 1.5, True, [], {}, ["a"], ""])
@pytest.mark.parametrize("kind", ["subscribe", "unsubscribe", "message"])
def test_bad_channel_carries_id(kind, channel):
    """A channel that is not a non-empty string is a bad_request carrying the id."""
    assert bad({"type": kind, "channel": channel, "content": 1, "id": "c"}).request_id == "c"


@pytest.mark.parametrize("kind", ["subscribe", "unsubscribe"])
def test_missing_or_null_channel_for_subscriptions(kind):
    """subscribe/unsubscribe need a channel: missing or null is a bad_request."""
    assert bad({"type": kind, "id": 5}).request_id == 5
    assert bad({"type": kind, "channel": None, "id": 5}).request_id == 5


def test_channel_too_long_carries_id():
    """A channel over 255 UTF-8 bytes is a bad_request carrying the id."""
    assert bad({"type": "subscribe", "channel": "x" * (MAX_CHANNEL + 1), "id": 1}).request_id == 1
    assert bad({"type": "subscribe", "channel": "é" * 128, "id": 2}).request_id == 2  # 256 bytes


@pytest.mark.parametrize(
    "since", ["", "abc", "-1", "1-2-3", "1.5", " 1", "1 ", "0x10", 17, 1.0, True, [], {}, "1" * 42, "²", "-"]
)
def test_malformed_since_carries_id(since):
    """A since that is not "<ms>-<seq>" is a bad_request carrying the id."""
    assert bad({"type": "subscribe", "channel": "a", "since": since, "id": "s"}).request_id == "s"


@pytest.mark.parametrize("rid", [True, False, 1.5, 1.0, {"a": 1}, [1], 2**53 + 1, -(2**53) - 1, "x" * 129])
def test_bad_id_is_bad_request(rid):
    """An id of the wrong type (bool, float, object, list) or out of range is a bad_request."""
    err = bad({"type": "subscribe", "channel": "a", "id": rid})
    assert err.request_id is None


@pytest.mark.parametrize("rid", ["", "x" * 128, 0, -5, 2**53, -(2**53)])
def test_good_ids_accepted(rid):
    """Strings up to 128 characters and integers within +-2**53 are valid ids."""
    assert parse({"type": "unsubscribe", "channel": "a", "id": rid}).id == rid


def test_missing_content_carries_id():
    """A message without content is a bad_request carrying the id."""
    assert bad({"type": "message", "channel": "a", "id": 8}).request_id == 8


@pytest.mark.parametrize("token", [None, "", 1, ["t"], {"t": 1}])
def test_bad_token_carries_id(token):
    """An auth frame without a non-empty token string is a bad_request carrying the id."""
    frame = {"type": "auth", "id": "a"}
    if token is not None:
        frame["token"] = token
    assert bad(frame).request_id == "a"


def test_binary_frame_is_bad_request():
    """A binary frame is a bad_request, even if it holds valid JSON."""
    bad(json.dumps({"type": "subscribe", "channel": "a", "id": 1}).encode(), binary=True)


def test_too_large_carries_a_leading_id():
    """A frame over max_size is too_large unparsed, with the id when it is the first member; at max_size it is accepted."""
    frame = {"id": "big", "type": "message", "content": "x" * 200}
    size = len(json.dumps(frame).encode())
    err = bad(frame, code="too_large", limit=size - 1)
    assert err.request_id == "big"
    assert parse(frame, limit=size) == Publish("big", "x" * 200, None)


def test_too_large_is_not_parsed():
    """An oversized frame is refused before parsing: an id that is not first, or broken JSON, does not matter."""
    assert bad({"type": "message", "content": "x" * 100, "id": 7}, code="too_large", limit=50).request_id is None
    assert bad(b'{"id":3,' + b"[" * 5000, code="too_large", limit=100).request_id == 3


@pytest.mark.parametrize(
    "payload, rid",
    [
        (b'{"id":1,"type":"x"}', 1),
        (b' { "id" : "a b" , "type":"x"}', "a b"),
        (b'{"id":"\\u00e9"}', "\u00e9"),
        (b'{"id":-9007199254740992,"x":1}', -(2**53)),
        (b'{"type":"x","id":1}', None),
        (b'{"id":1.5,"type":"x"}', None),
        (b'{"id":true,"type":"x"}', None),
        (b'{"id":"' + b"x" * 129 + b'","type":"x"}', None),
        (b'{"id":01,"type":"x"}', None),
        (b'{"id":"a', None),
        (b"[1]", None),
    ],
)
def test_leading_id(payload, rid):
    """leading_id reads an id that is the first member, and nothing else."""
    assert leading_id(payload) == rid


# -- offsets ---------------------------------------------------------------------


def test_offsets_parse_format_and_order():
    """Offsets parse to (ms, seq) tuples, round-trip, and order numerically, not as strings."""
    assert parse_offset("1700000000000-3") == (1700000000000, 3)
    assert parse_offset("17") == (17, 0)
    assert parse_offset("0-0") == (0, 0)
    assert format_offset(parse_offset("1700000000000-3")) == "1700000000000-3"
    assert parse_offset("9-5") < parse_offset("10-0") < parse_offset("10-1") < parse_offset("10-10")
    assert "9-5" > "10-0"  # why they must be compared as tuples
    for bad_offset in ("", "a-1", "1-a", "-", "1--1", None, 5, "1" * 42, "١٢-٣", "1-2 "):
        with pytest.raises(ValueError):
            parse_offset(bad_offset)


def test_check_channel():
    """check_channel returns a valid name and raises ValueError otherwise."""
    assert check_channel("a") == "a"
    for value in ("", None, 3, "x" * 256, "a\ud800"):
        with pytest.raises(ValueError):
            check_channel(value)


# -- encoding --------------------------------------------------------------------


def test_encode_compact_utf8():
    """encode writes compact JSON with UTF-8 characters unescaped."""
    assert encode({"a": "é", "b": [1, 2]}) == '{"a":"é","b":[1,2]}'.encode()


def test_encode_refuses_what_browsers_cannot_parse():
    """encode refuses lone surrogates and non-finite floats: nothing parsed strictly produces them."""
    for value in ({"content": "a\ud800b"}, {"content": float("nan")}, {"x": [float("inf")]}):
        with pytest.raises(ValueError):
            encode(value)


def test_message_payload_is_spliced_json():
    """A message frame is joined from encoded content, channel and offset, and parses back."""
    payload = message_payload(b'{"a":[1,"\xc3\xa9"]}', "n\u00e9ws", b"17-3")
    assert json.loads(payload) == {"type": "message", "content": {"a": [1, "é"]}, "channel": "néws", "offset": "17-3"}
    assert json.loads(message_payload(b'"x"', None, b"1-0"))["channel"] is None


def test_text_frames():
    """Text frames use the 7-bit, 16-bit and 64-bit length forms, unmasked."""
    assert text_frame(b"hi") == b"\x81\x02hi"
    assert text_frame(b"x" * 126)[:4] == b"\x81\x7e\x00\x7e"
    assert text_frame(b"x" * 65536)[:10] == b"\x81\x7f" + (65536).to_bytes(8, "big")


def test_reply_and_error_frames():
    """Replies and errors carry the id only when the request had one."""
    assert json.loads(reply_frame("ack", None)) == {"type": "ack"}
    assert json.loads(reply_frame("subscribed", 0, channel="a")) == {"type": "subscribed", "id": 0, "channel": "a"}
    assert "id" not in json.loads(error_frame("rate_limited", "slow down"))


def test_lone_surrogate_is_bad_request():
    """An unpaired surrogate escape anywhere in a frame is a bad_request (it has no UTF-8 form), with a leading id."""
    for payload in (
        b'{"id":1,"type":"message","content":"a\\ud800b"}',
        b'{"id":1,"type":"message","content":{"k":["\\uDFFF"]}}',
        b'{"id":1,"type":"message","content":"x","channel":"\\ud800"}',
        b'{"id":1,"type":"subscribe","channel":"\\udbff"}',
    ):
        assert bad(payload).request_id == 1, payload


def test_surrogate_pairs_and_escaped_backslashes_accepted():
    """A valid surrogate pair escape, or an escaped backslash before "ud800", is accepted."""
    assert parse(b'{"type":"message","content":"\\ud83d\\ude00"}').content == "\U0001f600"
    assert parse(b'{"type":"message","content":"\\\\ud800"}').content == "\\ud800"


# -- fuzz ------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)

frames = st.fixed_dictionaries(
    {},
    optional={
        "type": st.sampled_from(["message", "subscribe", "unsubscribe", "auth", "x"]) | json_values,
        "channel": st.text(max_size=300) | json_values,
        "since": st.from_regex(r"\A[0-9]{0,20}(-[0-9]{0,20})?\Z") | json_values,
        "id": st.integers() | st.text(max_size=140) | json_values,
        "content": json_values,
        "token": st.text(max_size=10) | json_values,
    },
)


def _only_wire_errors(payload: bytes, binary: bool, limit: int) -> None:
    try:
        request = parse_request(payload, binary, limit, RULES)
    except WireError as e:
        assert e.code in ("bad_request", "too_large")
        assert e.request_id is None or isinstance(e.request_id, (str, int))
        error_frame(e.code, e.message, e.request_id).decode("utf-8")
    else:
        assert isinstance(request, (Publish, Subscribe, Unsubscribe, Auth))
        assert not binary and len(payload) <= limit


@settings(derandomize=True, max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(payload=st.binary(max_size=300), binary=st.booleans(), limit=st.integers(0, 400))
def test_fuzz_arbitrary_bytes(payload, binary, limit):
    """Arbitrary bytes never raise anything but WireError."""
    _only_wire_errors(payload, binary, limit)


@pytest.mark.slow  # 400 Hypothesis examples: about 2.5 s
@settings(derandomize=True, max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(value=json_values | frames, limit=st.integers(0, 2000))
def test_fuzz_arbitrary_json(value, limit):
    """Arbitrary JSON values and frame-shaped objects never raise anything but WireError."""
    _only_wire_errors(json.dumps(value).encode(), False, limit)
    _only_wire_errors(json.dumps(value, ensure_ascii=False).encode("utf-8", "surrogatepass"), False, limit)
