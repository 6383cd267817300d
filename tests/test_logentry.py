"""The pure decoder of log entries (pushservice.logentry): what becomes a message frame, and what is a BadEntry."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support.clients import strict_loads

from pushservice.ingest import IngestRules
from pushservice.logentry import BadEntry, Message, decode_entry, gap_message
from pushservice.strictjson import JSONRules

RULES = IngestRules(JSONRules(max_depth=64, max_number=100), max_item_size=1024)


def framed(payload: bytes) -> bytes:
    """A framer that shows it was applied."""
    return b"<" + payload + b">"


def decode(fields: dict[bytes, bytes] | list[bytes], entry_id: bytes = b"1700000000000-3") -> Message:
    flat = fields if isinstance(fields, list) else [x for pair in fields.items() for x in pair]
    return decode_entry(entry_id, flat, framed, RULES)


def frame_of(message: Message) -> dict[str, object]:
    """The frame's JSON, parsed strictly (as a browser would)."""
    assert message.frame.startswith(b"<") and message.frame.endswith(b">")
    return strict_loads(message.frame[1:-1])  # type: ignore[no-any-return]


def bad(fields: dict[bytes, bytes] | list[bytes], entry_id: bytes = b"1700000000000-3") -> BadEntry:
    with pytest.raises(BadEntry) as info:
        decode(fields, entry_id)
    assert str(info.value), "a BadEntry says why"
    return info.value


# -- good entries -------------------------------------------------------------------------


def test_an_entry_with_content_channel_and_user():
    """s, c, ch and u: a message for that channel and user, framed once, with its offset and sequence number."""
    message = decode({b"s": b"42", b"c": b'{"a":[1,2.5,null]}', b"ch": b"news", b"u": b"7"})
    assert (message.offset, message.channel, message.user, message.seq, message.gap) == (
        (1700000000000, 3),
        "news",
        "7",
        42,
        False,
    )
    assert frame_of(message) == {
        "type": "message",
        "content": {"a": [1, 2.5, None]},
        "channel": "news",
        "offset": "1700000000000-3",
    }


def test_a_broadcast_entry_and_one_without_a_sequence_number():
    """Only c: a broadcast (channel and user None); an entry written before s existed has seq None."""
    message = decode({b"c": b'"hello"'})
    assert (message.channel, message.user, message.seq) == (None, None, None)
    assert frame_of(message)["content"] == "hello" and frame_of(message)["channel"] is None


def test_the_content_is_relayed_as_written():
    """The frame carries c's bytes as they are (already canonical), not re-encoded."""
    message = decode({b"s": b"1", b"c": b'{"b":1,"a":"\\u00e9"}'})
    assert b'"content":{"b":1,"a":"\\u00e9"},' in message.frame


@pytest.mark.parametrize(
    "data, content, channel, user",
    [
        (b'{"content":{"x":1},"user":"42"}', {"x": 1}, None, "42"),
        (b'{"content":"n","channel":"news"}', "n", "news", None),
        (b"written by 0.1", "written by 0.1", None, None),
        (b"[1,2]", "[1,2]", None, None),
    ],
)
def test_legacy_k_and_d_entries_are_decided_by_the_same_rules(data, content, channel, user):
    """pushservice 0.1's entries (k, d: the item as pushed) become the message the item would be today."""
    message = decode({b"k": b"e", b"d": data})
    assert (message.channel, message.user, message.seq) == (channel, user, None)
    assert frame_of(message)["content"] == content


def test_a_gap_marker_reaches_everyone():
    """gap_message: a gap frame at the offset of the first message after the gap, for every connection."""
    message = gap_message((1700000000000, 9), "trimmed", 4, framed)
    assert message.gap and (message.channel, message.user, message.seq) == (None, None, None)
    assert frame_of(message) == {"type": "gap", "reason": "trimmed", "missed": 4, "offset": "1700000000000-9"}


# -- bad entries ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fields, why",
    [
        ({b"s": b"5"}, "no content"),
        ({b"s": b"5", b"u": b"42"}, "no content"),
        ({b"s": b"5", b"ch": b"news"}, "no content"),
        ({b"s": b"5", b"": b""}, "no content"),
        ({b"s": b"5", b"c": b"NaN"}, ""),
        ({b"s": b"5", b"c": b'1,"channel":"private:hr"'}, ""),
        ({b"s": b"5", b"c": b"1" * 101}, ""),
        ({b"s": b"5", b"c": b"[" * 65 + b"]" * 65}, ""),
        ({b"s": b"5", b"c": b'"\xff\xfe"'}, ""),
        ({b"s": b"5", b"c": b'{"a":1,"a":2}'}, ""),
        ({b"s": b"5", b"c": b'"' + b"x" * 7000 + b'"'}, "bytes"),
        ({b"s": b"5", b"c": b"1", b"ch": b""}, "channel"),
        ({b"s": b"5", b"c": b"1", b"ch": b"news*"}, "channel"),
        ({b"s": b"5", b"c": b"1", b"ch": b"private:[a-z]"}, "channel"),
        ({b"s": b"5", b"c": b"1", b"ch": b"\xff\xfe"}, ""),
        ({b"s": b"5", b"c": b"1", b"ch": b"x" * 256}, "channel"),
        ({b"s": b"5", b"c": b"1", b"u": b""}, "user"),
        ({b"s": b"5", b"c": b"1", b"u": b"\xc3("}, ""),
        ({b"s": b"5", b"k": b"e", b"d": b'{"content":NaN,"user":"42"}'}, ""),
        ({b"s": b"5", b"k": b"e", b"d": b'{"content":1,"user":"42","user":"7"}'}, ""),
        ({b"s": b"5", b"k": b"e", b"d": b'{"user":"42"}'}, "content"),
        ({b"s": b"5", b"k": b"t", b"d": b"\xff\xfe"}, "UTF-8"),
    ],
)
def test_every_kind_of_bad_entry_is_a_bad_entry_with_its_seq(fields, why):
    """No content, content that is not strict JSON or too big, a bad channel or user, a refused legacy item: BadEntry, seq kept."""
    error = bad(fields)
    assert error.seq == 5, "it still counts for gap detection"
    assert why in str(error), str(error)


@pytest.mark.parametrize("s", [b"x", b"1e3", b"", b"1.0", b"\xff"])
def test_an_unreadable_sequence_number_is_a_bad_entry_without_one(s):
    """An s that is not an integer: BadEntry, seq None (also when the rest would be good)."""
    assert bad({b"s": s, b"c": b"1"}).seq is None


@pytest.mark.parametrize("entry_id", [b"nope", b"", b"1-2-3", b"\xff"])
def test_an_entry_id_that_is_no_offset_is_a_bad_entry(entry_id):
    """An entry id that is not "<ms>-<seq>": BadEntry, with the s that was read."""
    assert bad({b"s": b"5", b"c": b"1"}, entry_id).seq == 5


def test_an_odd_field_list_is_read_by_its_pairs():
    """A trailing name without a value is ignored; what the pairs hold decides."""
    assert decode([b"s", b"5", b"c", b"1", b"ch"]).channel is None
    assert bad([b"s", b"5", b"c"]).seq == 5


@settings(derandomize=True, max_examples=300, deadline=None)
@given(
    fields=st.lists(
        st.sampled_from([b"s", b"c", b"ch", b"u", b"k", b"d", b"x"]) | st.binary(max_size=3), max_size=8
    ).flatmap(
        lambda names: st.tuples(
            st.just(names), st.lists(st.binary(max_size=20), min_size=len(names), max_size=len(names))
        )
    ),
)
def test_any_fields_give_a_message_or_a_bad_entry(fields):
    """Whatever an entry holds, decoding gives a message with a strict-JSON frame or raises BadEntry, nothing else."""
    names, values = fields
    flat = [x for pair in zip(names, values) for x in pair]
    try:
        message = decode(flat)
    except BadEntry:
        return
    assert frame_of(message)["type"] == "message"
