"""The pure parts of the live view: pieces to text, brightness to shade, what changed between two
snapshots, and tokens per second from the Watch's commits."""

from __future__ import annotations

from positronic.v1 import cache_authority_pb2 as ca
from positronic.v1 import session_pb2
from positronic.view.commits import KEPT_COMMITS, Commit, CommitLog
from positronic.view.render import (
    SHOWN_REPLACED_CHARS,
    SHOWN_REPLACED_IDS,
    PieceBook,
    diff,
    piece_texts,
    render,
    shades,
)

S = session_pb2


def test_word_start_is_a_space_and_structural_pieces_stay():
    texts = piece_texts(["<s>", "▁Once", "▁upon", "a"], [True, False, False, False])
    assert texts == ["<s>", " Once", " upon", "a"]


def test_byte_pieces_are_joined_into_their_character_on_the_row_that_completes_it():
    # "€" is E2 82 AC in UTF-8: three byte rows, the character on the third.
    texts = piece_texts(["▁a", "<0xE2>", "<0x82>", "<0xAC>", "<0x0A>", "b"])
    assert texts == [" a", "", "", "€", "\n", "b"]
    assert "".join(texts) == " a€\nb"


def test_an_unfinished_character_shows_as_a_replacement_on_its_last_byte_row():
    assert piece_texts(["<0xE2>", "<0x82>", "x"]) == ["", "\ufffd", "x"]
    assert piece_texts(["y", "<0xF0>"]) == ["y", "\ufffd"]
    assert piece_texts(["<0xFF>"]) == ["\ufffd"]


def test_a_structural_row_is_never_read_as_a_byte():
    assert piece_texts(["<0x0A>"], [True]) == ["<0x0A>"]


def test_shade_is_brightness_normalised_by_the_snapshot_range():
    # halo's [0, 255] ...
    assert shades([0.0, 255.0, 127.5]) == ([0.0, 1.0, 0.5], 0.0, 255.0)
    # ... and attention sums on another scale read the same way.
    assert shades([0.1, 0.3, 0.2])[0] == [0.0, 1.0, 0.5]
    assert shades([7.0, 7.0]) == ([0.5, 0.5], 7.0, 7.0)
    assert shades([]) == ([], 0.0, 0.0)


def entry(ledger, token, piece, *, source=S.TOKEN_SOURCE_GENERATED, b=1.0, created=1, **kw):
    return S.MirrorEntry(
        ledger_id=ledger,
        token_id=token,
        piece=piece,
        brightness=b,
        source=source,
        created_version=created,
        **kw,
    )


def response(version, entries, created_ns=1000):
    for i, e in enumerate(entries):
        e.position = i
    return ca.GetSessionResponse(
        session=S.SessionInfo(
            session_id="s",
            version=version,
            row_count=len(entries),
            created_unix_ns=created_ns,
            budget=S.Budget(target_rows=4, hard_max_rows=8),
        ),
        mirror=entries,
    )


def five_rows():
    return [
        entry(0, 1, "<s>", source=S.TOKEN_SOURCE_STRUCTURAL, b=255),
        entry(1, 10, "▁the", source=S.TOKEN_SOURCE_PROMPT, b=10),
        entry(2, 11, "▁cat", source=S.TOKEN_SOURCE_PROMPT, b=20),
        entry(3, 12, "▁sat", b=30),
        entry(4, 13, "▁down", b=40),
    ]


def test_render_rows_carry_text_shade_source_and_what_a_merge_replaced():
    book = PieceBook()
    render(response(1, five_rows()), book)  # the book learns the pieces of ids 10 and 11
    merged = entry(
        5,
        20,
        "▁thecat",
        source=S.TOKEN_SOURCE_MERGED,
        b=20,
        created=2,
        replaced_ledger_ids=[1, 2],
        replaced_token_ids=[10, 11],
        replaced_text=" the cat",
    )
    rows = five_rows()
    snap = render(response(2, [rows[0], merged, rows[3], rows[4]]), book)
    assert [r["text"] for r in snap.rows] == ["<s>", " thecat", " sat", " down"]
    assert [r["source"] for r in snap.rows] == ["structural", "merged", "generated", "generated"]
    assert snap.rows[0]["shade"] == 1.0 and snap.rows[1]["shade"] == 0.0
    m = snap.rows[1]
    assert m["replaced_text"] == " the cat" and m["replaced_ids"] == [10, 11]
    assert m["replaced_pieces"] == [" the", " cat"] and m["merged_at"] == 2
    assert "replaced_text" not in snap.rows[2]


def test_a_parent_id_the_view_never_saw_has_no_piece():
    merged = entry(
        9,
        20,
        "x",
        source=S.TOKEN_SOURCE_MERGED,
        replaced_ledger_ids=[7, 8],
        replaced_token_ids=[77, 78],
    )
    snap = render(response(3, [merged]), PieceBook())
    assert snap.rows[0]["replaced_pieces"] == [None, None]


def test_what_a_merged_row_replaced_reaches_the_page_cut_short():
    merged = entry(
        9,
        20,
        "x",
        source=S.TOKEN_SOURCE_MERGED,
        replaced_ledger_ids=list(range(100)),
        replaced_token_ids=list(range(100)),
        replaced_text="é" * 30_000,  # 60 KB: the authority takes up to 64 KiB per row
    )
    row = render(response(3, [merged]), PieceBook()).rows[0]
    assert row["replaced_text"] == "é" * SHOWN_REPLACED_CHARS + "…"
    assert row["replaced_ids"] == list(range(SHOWN_REPLACED_IDS))
    assert len(row["replaced_pieces"]) == SHOWN_REPLACED_IDS


def merged_row(ledger, parents, token_ids, created):
    return entry(
        ledger,
        30 + ledger,
        f"▁m{ledger}",
        source=S.TOKEN_SOURCE_MERGED,
        created=created,
        replaced_ledger_ids=parents,
        replaced_token_ids=token_ids,
    )


def test_diff_marks_new_merges_and_evictions_with_where_they_were():
    prev_resp = response(1, five_rows())
    prev = render(prev_resp)
    rows = five_rows()
    # v2 merges ledgers 1+2 into 5; v3 evicts ledger 3 ("▁sat").
    cur_resp = response(3, [rows[0], merged_row(5, [1, 2], [10, 11], 2), rows[4]])
    cur = render(cur_resp)
    marks = diff(prev, cur, cur_resp.mirror, evicted=1)
    assert [(m["ledger"], m["version"]) for m in marks.merges] == [(5, 2)]
    assert marks.evictions == [{"text": " sat", "before": 4}]


def test_a_chain_of_merges_between_refreshes_is_no_eviction():
    # Two merges between snapshots: 1+2 -> 5 (never seen), then 5+3 -> 6. Ledgers 1 and 2 are
    # explained by no row the view can see, but the Watch said nothing was evicted.
    prev_resp = response(1, five_rows())
    prev = render(prev_resp)
    rows = five_rows()
    cur_resp = response(3, [rows[0], merged_row(6, [5, 3], [35, 12], 3), rows[4]])
    cur = render(cur_resp)
    assert diff(prev, cur, cur_resp.mirror, evicted=0).evictions == []
    assert len(diff(prev, cur, cur_resp.mirror, evicted=0).merges) == 1
    # Counts unknown: every unexplained row is marked.
    unknown = diff(prev, cur, cur_resp.mirror, evicted=-1).evictions
    assert [e["text"] for e in unknown] == [" the", " cat"]
    # Mixed interval: at most as many marks as the Watch counted.
    assert len(diff(prev, cur, cur_resp.mirror, evicted=1).evictions) == 1


def test_an_eviction_at_the_end_is_marked_after_the_last_row():
    prev = render(response(1, five_rows()))
    cur_resp = response(2, five_rows()[:4])
    assert diff(prev, render(cur_resp), cur_resp.mirror, evicted=1).evictions == [
        {"text": " down", "before": None}
    ]


def test_no_marks_against_nothing_or_another_session_under_the_same_id():
    cur_resp = response(3, five_rows()[:2])
    cur = render(cur_resp)
    assert diff(None, cur, cur_resp.mirror, evicted=-1) == diff(None, cur, cur_resp.mirror, 0)
    assert diff(None, cur, cur_resp.mirror, evicted=-1).evictions == []
    other = render(response(1, five_rows(), created_ns=999))
    assert diff(other, cur, cur_resp.mirror, evicted=-1).evictions == []


def test_tokens_per_second_leaves_out_the_prime_and_counts_a_window():
    log = CommitLog()
    assert log.tokens_per_s() is None
    log.add(Commit(1, 500, 0, 0, 0))  # the prime: 500 rows at once is no generation speed
    log.add(Commit(2, 1, 0, 0, 1_000_000_000))
    assert log.tokens_per_s() is None  # one generating commit: nothing to measure between
    for v in range(3, 13):  # 10 more tokens, one every 100 ms
        log.add(Commit(v, 1, 1, 0, 1_000_000_000 + (v - 2) * 100_000_000))
    assert log.tokens_per_s() == 10.0
    # Only the last 5 s count: a burst long ago does not lift today's rate.
    log.add(Commit(13, 1, 0, 0, 60_000_000_000))
    log.add(Commit(14, 1, 0, 0, 62_000_000_000))
    assert log.tokens_per_s() == 0.5


def test_a_log_keeps_only_the_last_two_rate_windows_of_commits():
    log = CommitLog()
    for v in range(1, 101):  # one commit a second for 100 s
        log.add(Commit(v, 1, 0, 1, v * 1_000_000_000))
    assert len(log) == 11  # the commits of the last 10 s
    assert log.evicted_between(95, 100) == 5
    assert log.evicted_between(50, 100) == -1  # no longer known
    fast = CommitLog()
    for v in range(1, 10_001):  # 10,000 commits within one second
        fast.add(Commit(v, 1, 0, 0, v * 100_000))
    assert len(fast) == KEPT_COMMITS


def test_evicted_between_is_unknown_when_a_version_is_missing():
    log = CommitLog()
    for v, evicted in [(1, 0), (2, 1), (3, 0), (5, 2)]:
        log.add(Commit(v, 1, 0, evicted, v))
    assert log.evicted_between(1, 3) == 1
    assert log.evicted_between(0, 3) == 1
    assert log.evicted_between(3, 5) == -1  # version 4 never came
    log.add(Commit(2, 1, 0, 0, 9))  # an older version: another history, start over
    assert log.evicted_between(1, 2) == 0
    assert log.evicted_between(2, 5) == -1
