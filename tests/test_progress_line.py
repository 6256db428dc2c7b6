"""generate's progress line, rendered by a VT100 emulator (pyte): the text streamed beside it
stays intact on screen, the line sits below it, log records get rows of their own, and nothing
of the line is left once it closes."""

from __future__ import annotations

import io
import logging
import os
import pty

import pyte
import pytest

from positronic.progress_line import ProgressLine, advance, choose_mode

STORY = (
    "Once upon a time, there was a little girl named Lily. She liked to play in the park "
    "with her red ball.\n\nOne day the ball rolled away, and Lily ran after it."
)


class Terminal:
    """One screen that both streams write to (stdout and stderr on the same terminal)."""

    def __init__(self, columns: int, rows: int):
        self.buf = io.StringIO()
        self.screen = pyte.Screen(columns, rows)
        self.screen.set_mode(pyte.modes.LNM)  # the tty driver's onlcr: \n is \r\n
        self.stream = pyte.Stream(self.screen)
        self.fed = 0

    def rows(self) -> list[str]:
        value = self.buf.getvalue()
        self.stream.feed(value[self.fed :])
        self.fed = len(value)
        return [r.rstrip() for r in self.screen.display]


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def chunks(text: str, size: int = 3) -> list[str]:
    return [text[i : i + size] for i in range(0, len(text), size)]


def wrapped(text: str, columns: int) -> list[str]:
    """How a terminal with autowrap lays out `text` (single-width characters)."""
    rows = []
    for para in text.split("\n"):
        rows += [para[i : i + columns] for i in range(0, max(len(para), 1), columns)]
    return rows


def test_the_line_sits_below_the_text_and_leaves_it_intact():
    term, clock, count = Terminal(24, 40), Clock(), [0]
    line = ProgressLine(
        term.buf, term.buf, "below", lambda: f"{count[0]} tokens, a status longer than a row"
    )
    line.columns, line.clock = (lambda: 24), clock
    written = ""
    for c in chunks(STORY):
        count[0] += 1
        clock.t += 0.2
        line.write_text(c)
        written += c
        rows = term.rows()
        text_rows = wrapped(written, 24)
        if len(text_rows[-1]) == 24:
            text_rows.append("")  # the cursor already stands on the next row
        assert rows[: len(text_rows)] == [r.rstrip() for r in text_rows]
        status_row = rows[len(text_rows)]
        assert status_row == f"{count[0]} tokens, a status longer"[:23]  # one row, never wraps
        assert term.screen.cursor.y == len(text_rows) - 1
        assert term.screen.cursor.x == len(text_rows[-1])
    line.close()
    term.buf.write("\nstats line\n")
    rows = [r for r in term.rows() if r]
    assert rows == [r.rstrip() for r in wrapped(STORY, 24) if r] + ["stats line"]


def test_a_chunk_that_ends_at_the_margin_loses_no_character():
    term = Terminal(10, 10)
    line = ProgressLine(term.buf, term.buf, "below", lambda: "status", columns=lambda: 10)
    for c in ("abcde", "fghij", "klmno", "pqrst", "u"):  # rows end exactly at the margin
        line.write_text(c)
    line.close()
    assert term.rows()[:3] == ["abcdefghij", "klmnopqrst", "u"]


def test_scrolling_at_the_bottom_keeps_text_and_line_in_order():
    term, clock = Terminal(20, 4), Clock()
    line = ProgressLine(term.buf, term.buf, "below", lambda: "[status]", columns=lambda: 20)
    line.clock = clock
    for c in chunks(STORY):
        clock.t += 1
        line.write_text(c)
    rows = term.rows()
    assert rows[-1] == "[status]"
    last = [r.rstrip() for r in wrapped(STORY, 20)[-3:]]
    assert rows[:-1] == last
    line.close()
    assert term.rows() == [*last, ""]


def test_log_records_get_rows_of_their_own_and_the_text_goes_on_below():
    term = Terminal(30, 12)
    line = ProgressLine(term.buf, term.buf, "below", lambda: "[status]", columns=lambda: 30)
    line.write_text("Once upon a time")
    line.write_record("WARNING worker retry\n")
    line.write_text(", there was a cat.")
    line.close()
    assert term.rows()[:3] == ["Once upon a time", "WARNING worker retry", ", there was a cat."]
    assert "[status]" not in "".join(term.rows())


def test_beside_mode_rewrites_one_line_and_leaves_stdout_exactly_the_text():
    out, err = io.StringIO(), Terminal(40, 5)
    clock = Clock()
    line = ProgressLine(out, err.buf, "beside", lambda: f"t={clock.t:.0f}", columns=lambda: 40)
    line.clock = clock
    for c in chunks(STORY):
        clock.t += 1
        line.write_text(c)
    assert err.rows()[0] == f"t={clock.t:.0f}" and err.rows()[1:] == [""] * 4
    line.write_record("a log record\n")
    assert err.rows()[:2] == ["a log record", f"t={clock.t:.0f}"]
    line.close()
    err.buf.write("stats line\n")
    assert err.rows()[:3] == ["a log record", "stats line", ""]
    assert out.getvalue() == STORY


def test_plain_mode_writes_lines_without_escapes_at_most_once_a_second():
    out, err, clock = io.StringIO(), io.StringIO(), Clock()
    line = ProgressLine(out, err, "plain", lambda: f"t={clock.t}", clock=clock)
    for c in chunks(STORY, 1):
        clock.t += 0.5
        line.write_text(c)
    line.close()
    assert "\x1b" not in err.getvalue() and "\r" not in err.getvalue()
    # 0.5 s a chunk: a line with the first chunk, then one every second (every other chunk)
    assert err.getvalue().splitlines() == [f"t={k + 0.5}" for k in range(len(STORY) // 2)]
    assert out.getvalue() == STORY


def test_off_mode_writes_only_the_text():
    out, err = io.StringIO(), io.StringIO()
    line = ProgressLine(out, err, "off", lambda: "never")
    for c in chunks(STORY):
        line.write_text(c)
    line.close()
    assert out.getvalue() == STORY and err.getvalue() == ""


def test_advance_follows_the_terminals_width_rules():
    assert advance(0, "abc", 10) == 3
    assert advance(8, "abc", 10) == 1  # c wraps to the next row
    assert advance(0, "abcdefghij", 10) == 10  # at the margin, not yet wrapped
    assert advance(9, "猫", 10) == 2  # a wide character that does not fit wraps whole
    assert advance(0, "e\u0301", 10) == 1  # a combining accent takes no column
    assert advance(5, "x\ny", 10) == 1


def test_mode_follows_the_streams(tmp_path):
    master, slave = pty.openpty()
    other_master, other_slave = pty.openpty()
    try:
        tty = os.fdopen(slave, "w", closefd=False)
        other = os.fdopen(other_slave, "w", closefd=False)
        pipe = open(tmp_path / "out.txt", "w")  # noqa: SIM115
        assert choose_mode(tty, tty, None, "xterm") == "below"  # the demo: one terminal
        assert choose_mode(pipe, tty, None, "xterm") == "beside"  # text to a file
        assert choose_mode(other, tty, None, "xterm") == "beside"  # two terminals
        assert choose_mode(tty, pipe, None, "xterm") == "off"  # logs to a file: clean
        assert choose_mode(tty, pipe, True, "xterm") == "plain"  # unless asked
        assert choose_mode(tty, tty, False, "xterm") == "off"
        assert choose_mode(tty, tty, None, "dumb") == "off"
        assert choose_mode(tty, tty, True, "dumb") == "plain"
        pipe.close()
    finally:
        for fd in (master, slave, other_master, other_slave):
            os.close(fd)


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError):
        ProgressLine(io.StringIO(), io.StringIO(), "fancy", lambda: "")


def test_while_running_logs_go_above_the_line_and_an_error_closes_it_first():
    term = Terminal(30, 12)
    line = ProgressLine(term.buf, term.buf, "below", lambda: "[status]", columns=lambda: 30)
    handler = logging.StreamHandler(term.buf)
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        with pytest.raises(RuntimeError), line.running():
            line.write_text("Once upon a time")
            logging.getLogger("positronic.test").warning("worker retry")
            line.write_text(", there")
            raise RuntimeError("the loop failed")
        assert handler.stream is term.buf  # the handler writes to the terminal directly again
        assert not line.shown
        assert term.rows()[:3] == ["Once upon a time", "worker retry", ", there"]
        assert "[status]" not in "".join(term.rows())
    finally:
        root.removeHandler(handler)
