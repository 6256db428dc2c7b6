"""The Watch feed: a reader of one session reads and wakes only for that session's events, so
a commit costs the streams that care about it, not every open stream (attack report F2)."""

from __future__ import annotations

import asyncio

import pytest

from cache_authority.feed import Feed, FeedSignal, WatchEvent


def _event(session_id: str, version: int, deleted: bool = False) -> WatchEvent:
    return WatchEvent(session_id, version, b"d", "", 1, 1, 0, 0, 0, deleted)


def test_a_session_reader_reads_only_its_session():
    feed = Feed(capacity=8)
    lane = feed.lane("a")
    cursor = feed.cursor()
    feed.publish(_event("b", 1))
    feed.publish(_event("a", 1))
    feed.publish(_event("b", 2))
    events, cursor = feed.read_nowait(cursor, lane)
    assert [(e.session_id, e.version) for e in events] == [("a", 1)]
    assert feed.read_nowait(cursor, lane) == ([], cursor)  # nothing new
    everything, _ = feed.read_nowait(0)
    assert [(e.session_id, e.version) for e in everything] == [("b", 1), ("a", 1), ("b", 2)]


def test_a_quiet_session_reader_is_not_behind_when_other_sessions_fill_the_feed():
    feed = Feed(capacity=4)
    lane = feed.lane("quiet")
    cursor = feed.cursor()
    for v in range(1, 20):
        feed.publish(_event("busy", v))
    with pytest.raises(LookupError):
        feed.read_nowait(cursor)  # an all-session reader did fall behind
    feed.publish(_event("quiet", 1))
    events, _ = feed.read_nowait(cursor, lane)
    assert [e.version for e in events] == [1]


def test_a_session_reader_whose_own_events_were_dropped_is_told():
    feed = Feed(capacity=4)
    lane = feed.lane("a")
    cursor = feed.cursor()
    for v in range(1, 6):
        feed.publish(_event("a", v))
    with pytest.raises(LookupError):
        feed.read_nowait(cursor, lane)


def test_a_dropped_deletion_forgets_the_lane_and_its_reader_learns_it_fell_behind():
    feed = Feed(capacity=2)
    lane = feed.lane("a")
    cursor = feed.cursor()
    feed.publish(_event("a", 1, deleted=True))
    feed.publish(_event("b", 1))
    feed.publish(_event("b", 2))  # drops a's deletion: a's lane goes
    assert feed.lane("a") is not lane  # a new session of that id starts clean
    with pytest.raises(LookupError):
        feed.read_nowait(cursor, lane)


def test_signal_wakes_session_readers_only_for_their_session():
    async def run() -> None:
        feed = Feed()
        signal = FeedSignal(feed, asyncio.get_running_loop(), delay_s=0.0)
        a, b, every = signal.changed("a"), signal.changed("b"), signal.changed()
        feed.publish(_event("b", 1))
        await asyncio.sleep(0.01)
        assert b.done() and every.done()
        assert not a.done()  # session a's readers slept through b's commit
        assert signal.changed("a") is a
        feed.close()
        await asyncio.sleep(0.01)
        assert a.done()  # close wakes everyone
        signal.close()

    asyncio.run(run())
