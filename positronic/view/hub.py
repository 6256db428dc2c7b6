"""What the view server knows, fed by its one Watch, fanned out to every browser.

One Watch of every session (AuthorityLink.follow) feeds per-session commit logs and the session
list. A session that at least one browser shows is refreshed with GetSession when a commit
lands, at most `refresh_hz` times a second: commits during a refresh or the pause after it are
coalesced into the next one, so per-commit work is O(1) however fast a session runs, and the
authority sees at most refresh_hz GetSessions per shown session whatever the number of
browsers. Each result is rendered once and published on the session's Topic, which every
browser's event stream reads.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

import grpc

from positronic.v1 import cache_authority_pb2 as ca
from positronic.v1 import session_pb2
from positronic.view.commits import Commit, CommitLog
from positronic.view.link import AuthorityLink, LinkEvents, short
from positronic.view.render import PieceBook, Snapshot, diff, render
from positronic.view.topic import Topic

logger = logging.getLogger(__name__)

KEPT_MARKS = 40  # merges and evictions a page can list
CATCH_UP_S = 0.5  # how long a refresh waits for the Watch to report the versions it read
LIST_INTERVAL_S = 0.5  # the session list is published at most twice a second
MAX_LISTED = 1000  # sessions the list shows
# A page shows the newest rows of a session; a bigger one (hard_max is bounded only by the
# authority's memory) would make every refresh of every page a multi-MB redraw.
MAX_SHOWN_ROWS = 4096
MAX_SHOWN_GHOSTS = 64  # evicted rows drawn in place per refresh (all are counted)
# After a refresh the loop pauses at least this many times as long as the refresh took, so a
# huge session costs the view at most a fifth of its time whatever --refresh-hz says.
PAUSE_PER_REFRESH = 4.0
RETRY_S = 5.0  # a refresh that failed (and no commit asks again) is retried after this


@dataclass
class Watched:
    """One session as the view knows it."""

    session_id: str
    state: str = "live"  # live | deleted | missing (not on the authority now)
    version: int = 0
    rows: int = 0
    target: int = 0
    hard_max: int = 0
    position_offset: int = 0
    watch_version: int = 0  # newest version the Watch reported
    merges_seen: int = 0  # merges and evictions the Watch reported while this view ran
    evictions_seen: int = 0
    commits: CommitLog = field(default_factory=CommitLog)
    topic: Topic = field(default_factory=Topic)
    viewers: int = 0
    refresher: asyncio.Task | None = None
    dirty: asyncio.Event = field(default_factory=asyncio.Event)
    progressed: asyncio.Event = field(default_factory=asyncio.Event)
    snapshot: Snapshot | None = None
    book: PieceBook = field(default_factory=PieceBook)  # pieces of the ids this session showed
    marks: deque[dict] = field(default_factory=lambda: deque(maxlen=KEPT_MARKS))
    mark_seq: int = 0
    fresh: list[int] = field(default_factory=list)  # merged rows made since the last refresh
    ghosts: list[dict] = field(default_factory=list)  # rows evicted since the last refresh
    problem: str | None = None  # why the last GetSession failed, while the link is up

    def summary(self) -> dict:
        rate = self.commits.tokens_per_s()
        return {
            "session": self.session_id,
            "state": self.state,
            "version": self.version,
            "rows": self.rows,
            "target": self.target,
            "hard_max": self.hard_max,
            "tokens_per_s": None if rate is None else round(rate, 2),
        }

    def payload(self) -> dict:
        snap = self.snapshot
        merged_rows = sum(1 for r in snap.rows if "replaced_text" in r) if snap else 0
        rows = snap.rows if snap else []
        shown = rows[-MAX_SHOWN_ROWS:]
        return {
            **self.summary(),
            "position_offset": self.position_offset,
            "merges_seen": self.merges_seen,
            "evictions_seen": self.evictions_seen,
            "merged_rows": merged_rows,
            "brightness_range": [snap.lo, snap.hi] if snap else None,
            "tokens": shown,
            "hidden_rows": len(rows) - len(shown),  # the oldest, not sent
            "snapshot_version": snap.version if snap else None,
            "fresh": self.fresh,
            "ghosts": self.ghosts[:MAX_SHOWN_GHOSTS],
            "marks": list(self.marks),
            "problem": self.problem,
        }

    def take_info(self, info: session_pb2.SessionInfo) -> None:
        self.version, self.rows = info.version, info.row_count
        self.target, self.hard_max = info.budget.target_rows, info.budget.hard_max_rows
        self.position_offset = info.position_offset


class Hub:
    def __init__(self, link: AuthorityLink, refresh_hz: float = 4.0):
        if not refresh_hz > 0:
            raise ValueError("refresh_hz must be positive")
        self.link = link
        self.status = Topic()
        self.session_list = Topic()
        self.sessions: dict[str, Watched] = {}
        self._interval_s = 1.0 / refresh_hz
        self._list_dirty = asyncio.Event()
        self._list_stale = False  # a session appeared whose budget only ListSessions tells
        self._tasks: list[asyncio.Task] = []
        self._set_status("connecting", f"connecting to {link.address}")

    async def start(self) -> None:
        events = LinkEvents(connected=self._connected, commit=self._commit, down=self._down)
        self._tasks = [
            asyncio.create_task(self.link.follow(events), name="view-watch"),
            asyncio.create_task(self._list_loop(), name="view-list"),
        ]

    async def close(self) -> None:
        tasks = self._tasks + [w.refresher for w in self.sessions.values() if w.refresher]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.link.close()

    @contextlib.asynccontextmanager
    async def viewing(self, session_id: str) -> AsyncIterator[Watched]:
        """The session a browser shows, refreshed while at least one browser shows it."""
        w = self.sessions.get(session_id)
        if w is None:
            w = self.sessions[session_id] = Watched(session_id)
        w.viewers += 1
        if w.refresher is None:
            w.dirty.set()
            w.refresher = asyncio.create_task(self._refresh_loop(w), name=f"view-{session_id}")
        try:
            yield w
        finally:
            w.viewers -= 1
            if w.viewers == 0 and w.refresher is not None:
                w.refresher.cancel()
                w.refresher = None
                if w.state != "live":
                    self.sessions.pop(session_id, None)

    # --- the Watch (LinkEvents) ---

    def _connected(self, infos: Sequence[session_pb2.SessionInfo]) -> None:
        present = {info.session_id for info in infos}
        for sid, w in list(self.sessions.items()):
            if sid in present:
                continue
            if not w.viewers:
                del self.sessions[sid]
            elif w.state == "live":  # gone while the authority was away (a deleted one stays so)
                w.state = "missing"
                w.topic.publish(w.payload())
        for info in infos[:MAX_LISTED]:
            w = self.sessions.setdefault(info.session_id, Watched(info.session_id))
            if w.version > info.version:  # another history under this id: start over
                w.commits.clear()
                w.snapshot = None
            w.take_info(info)
            w.watch_version = info.version
            w.state = "live"
        for w in self.sessions.values():
            if w.viewers:
                w.dirty.set()
        self._list_dirty.set()
        self._set_status("live", f"watching {self.link.address}")

    def _commit(self, c: ca.WatchResponse) -> None:
        w = self.sessions.get(c.session_id)
        if w is None:
            if c.deleted:
                return
            w = self.sessions[c.session_id] = Watched(c.session_id)
            self._list_stale = True
        self._list_dirty.set()
        if c.deleted:
            w.state, w.version, w.problem = "deleted", c.version, None
            logger.info("session %s v%d: deleted", c.session_id, c.version)
            if w.viewers:
                w.topic.publish(w.payload())
            else:
                del self.sessions[c.session_id]
            return
        if w.state != "live" or c.version < w.watch_version:  # re-created under the same id
            w.state, w.snapshot = "live", None
            self._list_stale = True
        w.commits.add(Commit(c.version, c.appended, c.merged, c.evicted, c.committed_unix_ns))
        w.version, w.rows, w.watch_version = c.version, c.row_count, c.version
        w.merges_seen += c.merged
        w.evictions_seen += c.evicted
        w.progressed.set()
        if w.viewers:
            w.dirty.set()

    def _down(self, reason: str) -> None:
        if self._set_status("down", reason):  # logged once, not at every retry
            logger.warning("authority %s: %s; retrying", self.link.address, reason)

    def _set_status(self, state: str, detail: str) -> bool:
        """Publish the link's state; False when it is the same news as before."""
        old = self.status.value
        if old is not None and old["state"] == state and old["detail"] == detail:
            return False
        since = old["since_unix_s"] if old is not None and old["state"] == state else time.time()
        self.status.publish(
            {
                "state": state,
                "authority": self.link.address,
                "detail": detail,
                "since_unix_s": since,
            }
        )
        return True

    # --- refreshing what browsers show ---

    async def _refresh_loop(self, w: Watched) -> None:
        while True:
            await w.dirty.wait()
            w.dirty.clear()
            loop = asyncio.get_running_loop()
            started = loop.time()
            try:
                await self._refresh(w)
            except Exception as e:  # a bug: say so, and keep the page alive
                logger.exception("session %s v%d: refresh failed", w.session_id, w.version)
                self._problem(w, f"the view failed to show it ({type(e).__name__})")
            took = loop.time() - started
            await asyncio.sleep(max(self._interval_s, PAUSE_PER_REFRESH * took))

    async def _refresh(self, w: Watched) -> None:
        try:
            resp = await self.link.get_session(w.session_id)
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.NOT_FOUND:
                if w.state == "live" or w.problem:
                    w.state, w.problem = "missing", None
                    w.topic.publish(w.payload())
            elif e.code() != grpc.StatusCode.UNAVAILABLE:
                # The link is up but this read fails (too big to send, refused, too slow): the
                # page says so rather than freezing, and the read is tried again.
                self._problem(w, f"GetSession failed: {e.code().name}: {short(e.details())}")
            # UNAVAILABLE is the link's to report; it refreshes every shown session when the
            # authority answers again.
            return
        version = resp.session.version
        if w.state == "deleted" and version <= w.version:
            return  # read just before the deletion the Watch already reported
        await self._caught_up(w, version)
        snap = render(resp, w.book)
        prev = w.snapshot
        evicted = w.commits.evicted_between(prev.version, version) if prev else 0
        marks = diff(prev, snap, resp.mirror, evicted)
        for m in marks.merges:
            self._mark(w, {"kind": "merge", **m})
        for gone in marks.evictions:
            self._mark(w, {"kind": "evict", "version": version, "text": gone["text"]})
        w.fresh = [m["ledger"] for m in marks.merges]
        w.ghosts = marks.evictions
        w.snapshot, w.state, w.problem = snap, "live", None
        w.take_info(resp.session)
        w.topic.publish(w.payload())
        logger.debug("session %s v%d: refreshed", w.session_id, version)

    async def _caught_up(self, w: Watched, version: int) -> None:
        """Wait (briefly) until the Watch has reported `version`, so that the commit counts of
        the interval are known when it is marked."""
        deadline = asyncio.get_running_loop().time() + CATCH_UP_S
        while w.watch_version < version:
            w.progressed.clear()
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(w.progressed.wait(), left)

    def _problem(self, w: Watched, problem: str) -> None:
        logger.warning("session %s: %s", w.session_id, problem)
        w.problem = problem
        w.topic.publish(w.payload())
        asyncio.get_running_loop().call_later(RETRY_S, w.dirty.set)

    def _mark(self, w: Watched, mark: dict) -> None:
        w.mark_seq += 1
        w.marks.append({"seq": w.mark_seq, **mark})

    # --- the session list ---

    async def _list_loop(self) -> None:
        while True:
            await self._list_dirty.wait()
            self._list_dirty.clear()
            try:
                await self._publish_list()
            except Exception:  # a bug: say so, and keep listing
                logger.exception("publishing the session list failed")
            await asyncio.sleep(LIST_INTERVAL_S)

    async def _publish_list(self) -> None:
        if self._list_stale:
            self._list_stale = False
            with contextlib.suppress(grpc.aio.AioRpcError):
                for info in await self.link.list_sessions():
                    w = self.sessions.get(info.session_id)
                    if w is not None and w.state == "live":
                        w.take_info(info)
        # Sessions a browser asked for that the authority does not hold are not listed.
        listed = sorted(
            (w for w in self.sessions.values() if w.state != "missing"),
            key=lambda w: w.session_id,
        )
        self.session_list.publish(
            {
                "sessions": [w.summary() for w in listed[:MAX_LISTED]],
                "total": len(listed),
            }
        )
