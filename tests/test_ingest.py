"""Unit tests of the one decision per producer item (pushservice.ingest) and the strict JSON rules under it."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pushservice.ingest import Entry, IngestRules, Undeliverable, looks_like_an_object
from pushservice.strictjson import JSONRules, StrictJSONError, dumps, nesting_exceeds

RULES = IngestRules(JSONRules(max_depth=64, max_number=100))


def classify(item: bytes | str) -> Entry | Undeliverable:
    return RULES.classify(item.encode() if isinstance(item, str) else item)


def dead(item: bytes | str) -> str:
    decided = classify(item)
    assert isinstance(decided, Undeliverable), (item, decided)
    return decided.reason


# -- what is delivered ------------------------------------------------------------


def test_envelope_with_channel_and_user():
    """An envelope is delivered to its audience, its content re-encoded canonically."""
    assert classify('{"content": {"a": [1, 2.5, null]}, "channel": "news", "user": "42"}') == Entry(
        b'{"a":[1,2.5,null]}', "news", "42"
    )
    assert classify('{"content":"x","channel":null,"user":null}') == Entry(b'"x"')


def test_anything_else_is_a_broadcast_string():
    """Plain text, JSON that is not an object, and objects that name no audience are broadcast verbatim."""
    for item in ("hello", "[1,2]", '"quoted"', "42", "", " ", '{"title": "no audience"}', "a {b"):
        decided = classify(item)
        assert decided == Entry(dumps(item)), item
        assert json.loads(decided.content) == item


def test_a_bom_before_an_envelope_is_allowed():
    """RFC 8259 lets a parser ignore a UTF-8 BOM: a BOM-prefixed envelope keeps its audience."""
    assert classify("\ufeff" + '{"content":1,"user":"42"}') == Entry(b"1", None, "42")


# -- what is dead-lettered --------------------------------------------------------------

ENVELOPE = '{"content":"secret","user":"42"}'


@pytest.mark.parametrize(
    "item",
    [
        # what Redis' cjson accepts and strict JSON does not
        '{"content":"a\tb","user":"42"}',
        '{"content":"a\nb","user":"42"}',
        '{"content":0x10,"user":"42"}',
        '{"content":007,"user":"42"}',
        '{"content":+1,"user":"42"}',
        '{"content":NaN,"user":"42"}',
        '{"content":Infinity,"user":"42"}',
        '{"content":-Infinity,"user":"42"}',
        '{"content":1.,"user":"42"}',
        '{"content":-.5,"user":"42"}',
        ENVELOPE + "\x00trailing",
        ENVELOPE + " x",
        '{"content":' + "1" * 4400 + ',"user":"42"}',
        '{"content":' + "9" * 101 + ',"user":"42"}',
        '{"content":1e400,"user":"42"}',
        '{"content":' + "[" * 64 + "]" * 64 + ',"user":"42"}',
        '{"content":' + "[" * 2000 + "]" * 2000 + ',"user":"42"}',
        '{"content":"\\ud800","user":"42"}',
        '{"content":"x","user":"42","user":"7"}',
        # invisible characters before the object: looks like an envelope, is not JSON
        "\u00a0" + ENVELOPE,
        "\u200b" + ENVELOPE,
        "\u2028" + ENVELOPE,
        "\ufeff\ufeff" + ENVELOPE,
        "\x00" + ENVELOPE,
        # broken JSON
        '{"content":"x","user":"42"',
        "{content: 1, user: 42}",
        "{'content': 1, 'user': '42'}",
    ],
)
def test_sloppy_envelopes_are_undeliverable_never_broadcast(item):
    """Every sloppy or malicious envelope-like item is undeliverable, never a broadcast."""
    dead(item)


@pytest.mark.parametrize(
    "item, why",
    [
        ('{"content":1,"channel":""}', "channel"),
        ('{"content":1,"channel":5}', "channel"),
        ('{"content":1,"channel":"' + "x" * 256 + '"}', "255"),
        ('{"content":1,"channel":"news*"}', "* ?"),
        ('{"content":1,"channel":"private:[a-z]"}', "* ?"),
        ('{"content":1,"user":42}', "user"),
        ('{"content":1,"user":""}', "user"),
        ('{"content":1,"user":["42"]}', "user"),
        ('{"content":1,"user":"' + "é" * 128 + '"}', "255"),
        ('{"user":"42","text":"no content"}', "content"),
        ('{"channel":"news"}', "content"),
        (b'\xff{"content":1}', "UTF-8"),
        (b'{"content":"\xed\xa0\x80"}', "UTF-8"),
    ],
)
def test_bad_audiences_are_undeliverable_with_a_reason(item, why):
    """A bad channel or user, an object naming an audience without content, or non-UTF-8: undeliverable, saying why."""
    assert why in dead(item)


def test_looks_like_an_object_skips_only_invisible_characters():
    """Whitespace, BOMs, controls and format characters are skipped; any visible character decides."""
    assert looks_like_an_object("{")
    assert looks_like_an_object(" \t\r\n\u00a0\u3000\ufeff\u200b\u2060\x00{")
    assert not looks_like_an_object("x{")
    assert not looks_like_an_object("[{")
    assert not looks_like_an_object("\uff5b")  # a fullwidth brace is not JSON's
    assert not looks_like_an_object("")


# -- the strict rules themselves ----------------------------------------------------


def test_nesting_is_measured_outside_strings():
    """Brackets inside strings (with escaped quotes and backslashes) do not count; unbalanced opens do."""
    assert not nesting_exceeds('["' + "[" * 100 + '"]', 64)
    assert not nesting_exceeds('["\\"' + "[" * 100 + '"]', 64)
    assert nesting_exceeds('["\\\\"' + ",[" * 100, 64)
    assert nesting_exceeds("[" * 65 + "]" * 65, 64)
    assert not nesting_exceeds("[" * 64 + "]" * 64, 64)
    assert not nesting_exceeds("[]" * 10000, 64)
    assert nesting_exceeds("[[]" * 100 + "]" * 100, 64)


def test_rules_agree_with_python_on_valid_json():
    """What the strict parser accepts parses to what json.loads gives."""
    rules = JSONRules()
    for text in ('{"a":[1,-2.5e10,true,false,null,"\\u00e9\\ud83d\\ude00"]}', "[]", "0", '" "', "-0.0"):
        assert rules.loads(text) == json.loads(text)


def test_limits_are_options():
    """Depth and number length are the rules' own, not the interpreter's."""
    with pytest.raises(StrictJSONError):
        JSONRules(max_depth=2).loads("[[[]]]")
    assert JSONRules(max_depth=3).loads("[[[]]]") == [[[]]]
    with pytest.raises(StrictJSONError):
        JSONRules(max_number=3).loads("1234")


# -- properties ---------------------------------------------------------------------

audience = st.fixed_dictionaries({}, optional={"user": st.text(max_size=5), "channel": st.text(max_size=5)})


@settings(derandomize=True, max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(max_size=200))
def test_every_byte_string_gets_one_decision(data):
    """Any bytes: a decision, never an exception; a broadcast never comes from an object naming an audience."""
    decided = RULES.classify(data)
    assert isinstance(decided, Entry | Undeliverable)
    if isinstance(decided, Entry) and decided.channel is None and decided.user is None:
        text = data.decode("utf-8")
        if looks_like_an_object(text):
            value = json.loads(text.removeprefix("\ufeff"))
            assert not {"content", "channel", "user"} & set(value)
        json.loads(decided.content)


@settings(derandomize=True, max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    meta=audience,
    content=st.recursive(st.none() | st.integers() | st.text(max_size=5), lambda c: st.lists(c, max_size=3)),
    prefix=st.sampled_from(["", " ", "\ufeff", "\u00a0", "\u200b", "\t\n"]),
    suffix=st.sampled_from(["", " ", "\n", "\x00", " junk", "}"]),
    mangle=st.sampled_from([None, ("1", "01"), ('"', "'"), (":", "=")]),
)
def test_an_envelope_reaches_its_audience_or_nobody(meta, content, prefix, suffix, mangle):
    """Sloppy renderings of an envelope with a user or channel are never a broadcast."""
    text = json.dumps({"content": content, **meta})
    if mangle is not None:
        text = text.replace(*mangle)
    decided = classify(prefix + text + suffix)
    if isinstance(decided, Entry) and meta:
        assert (decided.channel is None, decided.user is None) == ("channel" not in meta, "user" not in meta)
