"""Presence, pure: a node's counts and what it flushes (PresenceBook), one channel's users across nodes (ChannelView)."""

from __future__ import annotations

import pytest

from pushservice.presencebook import ChannelView, PresenceBook
from pushservice.strictjson import JSONRules
from pushservice.wire import PresenceQuery, Subscribe, WireError, parse_request

RULES = JSONRules(64, 100)


def test_book_counts_connections_and_flushes_only_what_changed():
    """Counts per channel and user; a flush carries new counts and the users whose presence flipped, once."""
    changes = []
    book = PresenceBook(lambda: changes.append(1))
    book.joined("ann", ["a", "b"])
    book.joined("ann", ["a"])
    book.joined(None, ["a"])
    assert (book.count("a", "ann"), book.count("b", "ann"), book.count("a", None)) == (2, 1, 1)
    assert changes, "a change must schedule a flush"
    taken = {c.channel: c for c in book.take_changes(100)}
    assert taken["a"].users == {"ann": 2} and taken["a"].anonymous == 1 and taken["a"].flipped == {"ann": True}
    assert taken["b"].users == {"ann": 1} and taken["b"].anonymous is None
    assert not book.has_changes() and book.take_changes(100) == []
    book.left("ann", ["a"])
    assert book.take_changes(100)[0].flipped == {}  # still one connection: no event
    book.left("ann", ["a"])
    (change,) = book.take_changes(100)
    assert change.users == {"ann": 0} and change.flipped == {"ann": False}


def test_book_coalesces_a_leave_and_return_between_flushes():
    """A user who leaves and comes back before the flush costs nothing: no write, no event."""
    book = PresenceBook()
    book.joined("ann", ["a"])
    book.take_changes(100)
    book.left("ann", ["a"])
    book.joined("ann", ["a"])
    assert book.take_changes(100) == []


def test_book_never_goes_negative_and_leave_all_empties_it():
    """A leave without a join is ignored; leave_all (the node stops) makes everyone leave in the next flush."""
    book = PresenceBook()
    book.left("ghost", ["a"])
    assert book.count("a", "ghost") == 0 and not book.has_changes()
    book.joined("ann", ["a"])
    book.joined(None, ["a"])
    book.take_changes(100)
    book.leave_all()
    book.left("ann", ["a"])  # its onClose, after the stop
    (change,) = book.take_changes(100)
    assert change.users == {"ann": 0} and change.anonymous == 0 and change.flipped == {"ann": False}
    assert book.channels() == []


def test_book_bounds_a_flush_and_takes_back_a_failed_one():
    """A flush takes whole channels up to the field bound; a failed one comes back as it was."""
    book = PresenceBook()
    for i in range(10):
        book.joined(f"u{i}", [f"c{i}"])
    first = book.take_changes(3)
    assert len(first) == 3
    book.restore(first)
    rest = book.take_changes(100)
    assert sorted(c.channel for c in rest) == [f"c{i}" for i in range(10)]
    assert all(c.flipped for c in rest)


def test_book_rewrites_a_channel_redis_lost():
    """lost(): every user and the anonymous count are written again, as joins."""
    book = PresenceBook()
    book.joined("ann", ["a"])
    book.joined(None, ["a"])
    book.take_changes(100)
    book.lost("a")
    (change,) = book.take_changes(100)
    assert change.users == {"ann": 1} and change.anonymous == 1 and change.flipped == {"ann": True}


def test_view_counts_a_user_once_across_nodes():
    """A user joins with its first node and leaves with its last one."""
    view = ChannelView()
    assert view.update("n1", 1, {"ann": True}) == [("ann", True)]
    assert view.update("n2", 1, {"ann": True}) == []
    assert view.update("n1", 2, {"ann": False}) == []
    assert view.update("n2", 2, {"ann": False}) == [("ann", False)]
    assert view.users() == set()


def test_view_ignores_old_news_and_drops_dead_nodes():
    """An update older than what the view knows of a node is ignored; a dropped node's users leave."""
    view = ChannelView()
    view.replace("n1", 5, {"ann", "bob"})
    assert view.update("n1", 4, {"ann": False}) == []  # older than the snapshot
    assert view.update("n1", 5, {"carl": True}) == []
    view.update("n2", 1, {"bob": True})
    assert sorted(view.drop("n1")) == [("ann", False)]
    assert view.users() == {"bob"}


def test_wire_parses_presence_requests_and_the_subscribe_flag():
    """``presence`` needs a channel; ``subscribe`` takes presence true/false, nothing else."""
    assert parse_request(b'{"type":"presence","channel":"r","id":3}', False, 1000, RULES) == PresenceQuery(3, "r")
    sub = parse_request(b'{"type":"subscribe","channel":"r","presence":true}', False, 1000, RULES)
    assert sub == Subscribe(None, "r", None, True)
    assert parse_request(b'{"type":"subscribe","channel":"r"}', False, 1000, RULES).presence is False
    for bad in (b'{"type":"presence"}', b'{"type":"subscribe","channel":"r","presence":1}'):
        with pytest.raises(WireError) as e:
            parse_request(bad, False, 1000, RULES)
        assert e.value.code == "bad_request"
