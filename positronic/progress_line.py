"""The progress line of `positronic generate`: one status line on stderr beside the text that
streams to stdout, and log records that do not tear either.

Three ways to show it (or `off`), chosen from what the two streams are:
- `beside`: stderr is a terminal and stdout is not (text to a file or a pipe): the line is
  rewritten in place with a carriage return.
- `below`: stdout and stderr are the same terminal (the demo case): the text streams without
  newlines, so the line lives on the row just below the text's cursor. Before each chunk of text
  the line is cleared (text that wraps must not land beside a stale status), after it the line is
  drawn again and the cursor is put back where the text ends. The text's column is tracked here
  (wcwidth, the terminal's own width rules) rather than saved with DECSC: a saved cursor cannot
  carry the terminal's pending-wrap state, so a chunk ending at the right margin would lose a
  character. Only stderr carries escape sequences; stdout stays exactly the text.
- `plain`: stderr is not a terminal but progress was asked for (`--progress`): a plain line at
  most once a second, for logs.
While the line is up, log records written to stderr go on rows of their own above it (the text
continues below them), so no record lands in the middle of the status or the story.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import TextIO

from wcwidth import wcwidth

MODES = ("off", "beside", "below", "plain")
DRAW_EVERY_S = 0.1  # a terminal line redrawn ten times a second reads as live
PLAIN_EVERY_S = 1.0  # a log gets at most a line a second
FALLBACK_COLUMNS = 80

# VT100/ECMA-48: index (down one row, scrolling at the bottom), erase to end of line, cursor up.
IND, EL, CUU = "\x1bD", "\x1b[K", "\x1b[A"


def choose_mode(stdout: TextIO, stderr: TextIO, requested: bool | None, term: str | None) -> str:
    """`requested` None: on exactly when stderr is a terminal that understands escapes."""
    tty = _isatty(stderr) and term != "dumb"
    if requested is False or (requested is None and not tty):
        return "off"
    if not tty:
        return "plain"
    return "below" if _same_file(stdout, stderr) else "beside"


class ProgressLine:
    """Writes the text to `out` and keeps the status line on `err`; `status()` makes the line.
    One lock orders text, status and log records (servers in this process log from their own
    threads)."""

    def __init__(
        self,
        out: TextIO,
        err: TextIO,
        mode: str,
        status: Callable[[], str],
        *,
        columns: Callable[[], int] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}")
        self.out, self.err, self.mode, self.status = out, err, mode, status
        self.columns = columns or (lambda: _terminal_columns(err))
        self.clock = clock
        self.col = 0  # the text's cursor column on the terminal (mode `below`)
        self.shown = False  # a status line is on the screen
        self._line = ""
        self._made_at = -float("inf")
        self._lock = threading.RLock()

    def write_text(self, text: str) -> None:
        with self._lock:
            if self.mode == "below":
                self._hide()
            self.out.write(text)
            self.out.flush()
            if self.mode == "below":
                self._advance(text)
            if self.mode != "off":
                self._draw()

    def close(self) -> None:
        """Take the line off the screen: what comes next (the stats line) takes its place."""
        with self._lock:
            if self.mode == "below":
                self._hide()
            elif self.mode == "beside" and self.shown:
                self._err("\r" + EL)
                self.shown = False

    def write_record(self, message: str) -> None:
        """A log record on rows of its own, the status line below it; text goes on below."""
        with self._lock:
            if self.mode == "beside" and self.shown:
                self._err("\r" + EL)
            elif self.mode == "below":
                self._hide()
                if self.col:
                    self._err(IND + "\r")
                    self.col = 0
            self._err(message)
            self.shown = False
            if self.mode == "below":
                self._advance(message)
            if self.mode in ("beside", "below"):
                self._draw(force=True)

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        """While the text streams: the root logger's handlers that write to `err` go through
        `write_record`; at the end (an error included) the line is closed first."""
        swapped = []
        if self.mode in ("beside", "below"):
            for handler in logging.getLogger().handlers:
                if isinstance(handler, logging.StreamHandler) and handler.stream is self.err:
                    swapped.append((handler, handler.setStream(_RecordStream(self))))
        try:
            yield
        finally:
            self.close()
            for handler, old in swapped:
                handler.setStream(old)

    # -- the terminal --------------------------------------------------------------------------
    def _draw(self, force: bool = False) -> None:
        now = self.clock()
        every = PLAIN_EVERY_S if self.mode == "plain" else DRAW_EVERY_S
        due = force or now - self._made_at >= every
        if due:
            self._line, self._made_at = self.status(), now
        if self.mode == "plain":
            if due:
                self._err(self._line + "\n")
        elif due or not self.shown:
            line = self._line[: max(self.columns() - 1, 0)]  # the status row never wraps
            if self.mode == "beside":
                self._err("\r" + line + EL)
            else:  # down a row (scrolling at the bottom), the line, back to the text's end
                self._err(IND + "\r" + line + EL + CUU + self._back())
            self.shown = True

    def _hide(self) -> None:
        if self.shown:
            self._err(IND + "\r" + EL + CUU + self._back())
            self.shown = False

    def _advance(self, text: str) -> None:
        columns = self.columns()
        self.col = advance(self.col, text, columns)
        if self.col >= columns:  # at the margin: go where the next character would go
            self._err(IND + "\r")
            self.col = 0

    def _back(self) -> str:
        return "\r" + (f"\x1b[{self.col}C" if self.col else "")

    def _err(self, s: str) -> None:
        self.err.write(s)
        self.err.flush()


class _RecordStream:
    """What a logging handler writes to while the progress line is up."""

    def __init__(self, line: ProgressLine):
        self.line = line

    def write(self, s: str) -> int:
        self.line.write_record(s)
        return len(s)

    def flush(self) -> None:
        self.line.err.flush()


def advance(col: int, text: str, columns: int) -> int:
    """The cursor column after `text` is written from `col` on a terminal `columns` wide with
    autowrap; `columns` means "at the right margin, the next character wraps"."""
    for ch in text:
        if ch in "\n\r":
            col = 0  # the terminal driver turns \n into \r\n (onlcr)
        elif ch == "\t":
            col = min((col // 8 + 1) * 8, columns)
        elif ch == "\b":
            col = max(col - 1, 0)
        else:
            w = wcwidth(ch)
            if w <= 0:
                continue  # combining marks and controls take no column
            if col + w > columns:
                col = 0
            col += w
    return col


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _same_file(a: TextIO, b: TextIO) -> bool:
    try:
        return os.path.samestat(os.fstat(a.fileno()), os.fstat(b.fileno()))
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        return False


def _terminal_columns(stream: TextIO) -> int:
    try:
        return os.get_terminal_size(stream.fileno()).columns or FALLBACK_COLUMNS
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        return FALLBACK_COLUMNS
