"""What a Patch acknowledgement promises about the write-ahead log, and the background flusher of
the batched setting.

- fsync (the default): the patch's log record is on stable storage (written and fsynced) before
  the reply. Survives a crash of the authority and of the machine.
- batch: the record is written to the operating system before the reply, so it survives a crash
  of the authority process; a background flusher fsyncs every log written since its last round,
  every fsync_interval_ms, so a crash of the machine (power, kernel) may lose the patches
  acknowledged in about the last interval.
- none: written to the operating system before the reply, never fsynced by the authority (the
  OS writes it back when it likes). Survives an authority crash; a machine crash may lose any
  patch the OS had not written back.

Snapshots, session creation and deletion are fsynced in every setting (they are rare and a
half-written one would hide older, complete state). A machine crash in batch or none may leave
damage past the last fsync in the newest log: recovery cuts the log at the first bad record in
those settings (the lost patches are what the setting allowed to lose), and refuses to start in
fsync mode, where damage before the end means the disk lost acknowledged data.
"""

from __future__ import annotations

import enum
import logging
import threading
from collections.abc import Callable

logger = logging.getLogger(__name__)


class Durability(enum.Enum):
    FSYNC = "fsync"
    BATCH = "batch"
    NONE = "none"

    @classmethod
    def parse(cls, value: str | Durability) -> Durability:
        if isinstance(value, Durability):
            return value
        try:
            return cls(value)
        except ValueError:
            names = ", ".join(d.value for d in cls)
            raise ValueError(f"durability must be one of {names}, not {value[:20]!r}") from None


class Flusher:
    """Calls flush(key) for every key marked since the last round, once per interval, in a
    daemon thread; close() stops it after a last round."""

    def __init__(self, interval_s: float, flush: Callable[[str], None]):
        if interval_s <= 0:
            raise ValueError("the fsync interval must be positive")
        self._interval_s = interval_s
        self._flush = flush
        self._dirty: set[str] = set()
        self._lock = threading.Lock()  # guards _dirty only: mark() never waits for an fsync
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="wal-flusher", daemon=True)
        self._thread.start()

    def mark(self, key: str) -> None:
        with self._lock:
            self._dirty.add(key)

    def flush_now(self) -> None:
        with self._lock:
            dirty, self._dirty = self._dirty, set()
        for key in sorted(dirty):
            try:
                self._flush(key)
            except OSError as e:  # acknowledged patches may be lost on a machine crash
                logger.error("session %s: background fsync of the log failed: %s", key, e)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.flush_now()

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            self.flush_now()
