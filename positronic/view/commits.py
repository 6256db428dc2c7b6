"""What the Watch stream says about one session, kept for a few seconds: commits per version,
from which come tokens per second and how many rows an interval evicted. Pure code."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

RATE_WINDOW_NS = 5_000_000_000  # tokens per second over the last 5 s of commits
# Commits are kept for two rate windows (the eviction counts between two refreshes need no
# more) and at most KEPT_COMMITS of them: the view keeps a log for every session on the
# authority, shown or not, so each must stay small.
KEPT_NS = 2 * RATE_WINDOW_NS
KEPT_COMMITS = 256


@dataclass(frozen=True)
class Commit:
    version: int
    appended: int
    merged: int
    evicted: int
    unix_ns: int  # commit time, the authority's clock


class CommitLog:
    """The newest commits of one session, in version order."""

    def __init__(self, capacity: int = KEPT_COMMITS):
        self._commits: deque[Commit] = deque(maxlen=capacity)

    def add(self, commit: Commit) -> None:
        if self._commits and commit.version <= self._commits[-1].version:
            self._commits.clear()  # a new session under the same id, or a restarted history
        self._commits.append(commit)
        while self._commits[0].unix_ns < commit.unix_ns - KEPT_NS:
            self._commits.popleft()

    def __len__(self) -> int:
        return len(self._commits)

    def clear(self) -> None:
        self._commits.clear()

    def tokens_per_s(self) -> float | None:
        """Tokens appended per second over the last RATE_WINDOW_NS of commit times (the prime,
        version 1, excluded); None with fewer than two commits to measure between."""
        return tokens_per_s(self._commits)

    def evicted_between(self, after: int, upto: int) -> int:
        """Rows evicted by versions after..upto (inclusive); -1 when a version is missing."""
        counted = [c for c in self._commits if after < c.version <= upto]
        if len(counted) != upto - after:
            return -1
        return sum(c.evicted for c in counted)


def tokens_per_s(commits: Iterable[Commit]) -> float | None:
    recent = [c for c in commits if c.version > 1]
    if len(recent) < 2:
        return None
    newest = recent[-1].unix_ns
    recent = [c for c in recent if c.unix_ns >= newest - RATE_WINDOW_NS]
    if len(recent) < 2:
        return None
    span_s = (recent[-1].unix_ns - recent[0].unix_ns) / 1e9
    if span_s <= 0:
        return None
    # The first commit opens the interval; the tokens of the others fill it.
    return sum(c.appended for c in recent[1:]) / span_s
