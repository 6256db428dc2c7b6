"""The patch engine against a plain-Python reference model of rows and mirror (hypothesis), the
slot layout (shorter side moves, rebases, O(edit) commits that restore exactly on failure), the
status each kind of bad op gets, and conversions that must round-trip exactly."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from unittest import mock

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cache_authority import slots, stage, validate
from cache_authority.convert import geometry_from_pb, geometry_to_pb
from cache_authority.engine import Engine
from cache_authority.ops import (
    GENESIS_DIGEST,
    AppendOp,
    EvictOp,
    PatchError,
    ReplacePairOp,
    Status,
    chain_digest,
    ops_from_pb,
)
from cache_authority.rows import Budget, SessionState
from cache_authority.snapshot import state_from_snapshot, state_to_snapshot
from cache_authority.state import apply_ops, commit_staged, stage_ops, validate_ops
from positronic import codec
from positronic.limits import MAX_BRIGHTNESS
from positronic.rope import rotate_keys
from positronic.v1 import session_pb2
from tests.authority_fixtures import (
    VOCAB,
    Reference,
    append_pb,
    assert_same_state,
    brightness_pb,
    evict_pb,
    kv,
    replace_pb,
    tiny_geometry,
)

HARD = 12  # C = 24 slots
MERGED = session_pb2.TOKEN_SOURCE_MERGED
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@dataclass
class Row:
    """One row of the reference model: what the mirror says and the tensors the row holds."""

    token: int
    ckey: torch.Tensor  # [L, H, D] as sent (computed at `origin`)
    value: torch.Tensor  # [L, H, D]
    origin: int
    brightness: float
    ledger: int
    source: int
    piece: str
    created: int
    replaced: tuple[tuple[int, ...], tuple[int, ...]] = ((), ())


def reference_apply(
    rows: list[Row], ledger: int, ops, version: int, offset: int
) -> tuple[list[Row], int]:
    """The contract, written the simple way: positions name pre-patch rows; new rows get ledger
    ids in op order; survivors keep their order; appended rows go last; new K/V were computed
    at the pre-patch offset + their pre-patch row index."""
    new_rows: dict[int, list[Row]] = {}
    for i, op in enumerate(ops):
        kind = op.WhichOneof("op")
        if kind == "append":
            a = op.append
            k, v = codec.decode(a.kv.keys), codec.decode(a.kv.values)
            new_rows[i] = [
                Row(t, k[:, :, j], v[:, :, j], offset + a.position + j,
                    a.brightness[j] if a.brightness else 255.0, ledger + j,
                    a.source or session_pb2.TOKEN_SOURCE_GENERATED, a.pieces[j], version)
                for j, t in enumerate(a.token_ids)
            ]  # fmt: skip
            ledger += len(a.token_ids)
        elif kind == "replace_pair":
            r = op.replace_pair
            k, v = codec.decode(r.kv.keys), codec.decode(r.kv.values)
            pair = rows[r.position : r.position + 2]
            replaced = (tuple(p.ledger for p in pair), tuple(p.token for p in pair))
            bright = float(torch.tensor(r.brightness, dtype=torch.float32))
            new_rows[i] = [Row(r.token_id, k[:, :, 0], v[:, :, 0], offset + r.position, bright,
                               ledger, MERGED, r.piece, version, replaced)]  # fmt: skip
            ledger += 1
    bright = {i: b for op in ops if op.HasField("set_brightness")
              for i, b in enumerate(op.set_brightness.brightness)}  # fmt: skip
    merged_at = {op.replace_pair.position: i for i, op in enumerate(ops)
                 if op.HasField("replace_pair")}  # fmt: skip
    evicted = {op.evict.position for op in ops if op.HasField("evict")}
    out: list[Row] = []
    skip = -1
    for p, row in enumerate(rows):
        if p == skip or p in evicted:
            continue
        if p in merged_at:
            out.extend(new_rows[merged_at[p]])
            skip = p + 1
            continue
        if p in bright:
            row = Row(**{**row.__dict__, "brightness": bright[p]})
        out.append(row)
    for i, op in enumerate(ops):
        if op.HasField("append"):
            out.extend(new_rows[i])
    return out, ledger


def reference_offset(offset: int, n: int, ops, capacity: int) -> int:
    """The documented slot rule: each edit, highest position first, moves its head up one slot
    when the head is strictly shorter than the tail after the edit; appends that would pass the
    capacity first move the rows back to slot 0."""
    edits = sorted(
        [(op.replace_pair.position, 2) for op in ops if op.HasField("replace_pair")]
        + [(op.evict.position, 1) for op in ops if op.HasField("evict")],
        reverse=True,
    )
    for p, width in edits:
        if p < n - p - width:
            offset += 1
        n -= 1
    appended = sum(len(op.append.token_ids) for op in ops if op.HasField("append"))
    return 0 if appended and offset + n + appended > capacity else offset


def check_against_reference(state: SessionState, rows: list[Row], offset: int) -> None:
    n = len(rows)
    assert state.row_count == n == len(state.meta)
    assert state.position_offset == offset and 0 <= offset <= state.capacity - n
    assert state.slot_range() == (offset, offset + n)
    # Row i sits in slot offset + i.
    assert state.token_ids[offset : offset + n].tolist() == [r.token for r in rows]
    assert state.live_token_ids() == [r.token for r in rows]
    assert state.live_origin_positions().tolist() == [r.origin for r in rows]
    expected_b = torch.tensor([r.brightness for r in rows], dtype=torch.float32)
    assert torch.equal(state.brightness[offset : offset + n], expected_b)
    for i, (m, r) in enumerate(zip(state.meta, rows, strict=True)):
        assert (m.ledger_id, m.source, m.piece, m.origin_position, m.created_version) == (
            r.ledger, r.source, r.piece, r.origin, r.created), i  # fmt: skip
        assert (m.replaced_ledger_ids, m.replaced_token_ids) == r.replaced
    if not rows:
        return
    ckeys = torch.stack([r.ckey for r in rows], dim=2)
    assert torch.equal(state.live_canonical_keys(), ckeys)
    assert torch.equal(state.live_values(), torch.stack([r.value for r in rows], dim=2))
    if state.rotated:
        # Every row's key is ONE rotation of its canonical key, to its position offset + i.
        offsets = offset + torch.arange(n) - torch.tensor([r.origin for r in rows])
        assert torch.equal(state.live_keys(), rotate_keys(ckeys, offsets, state.geometry.rope))


def draw_patch(
    data, rows: list[Row], seed: int, dtype=torch.float32, hard: int = HARD, ticking=False
):
    """Ops for one patch against `rows`, and the status expected (None: it must commit)."""
    n = len(rows)
    ops, expect, p, removed = [], None, 0, 0
    if n >= 3 and ticking and data.draw(st.sampled_from([True, True, True, False])):
        # A halo-like tick: an edit near the start (the head moves) and one appended row.
        # Repeated, these walk the offset up to a rebase.
        p = data.draw(st.integers(0, 1))
        if data.draw(st.booleans()):
            ops.append(replace_pb(p, [rows[p].token, rows[p + 1].token], 1, seed, dtype))
        else:
            ops.append(evict_pb(p, rows[p].token))
        return [*ops, append_pb(n, [2], seed + 1, dtype)], None
    while p < n:
        choice = data.draw(st.sampled_from(["keep", "keep", "evict", "merge"]))
        if choice == "merge" and p + 1 < n:
            ops.append(replace_pb(p, [rows[p].token, rows[p + 1].token],
                                  data.draw(st.integers(0, VOCAB - 1)), seed + p, dtype,
                                  brightness=data.draw(st.floats(0, 255, width=32))))  # fmt: skip
            p, removed = p + 2, removed + 1
        elif choice == "evict":
            ops.append(evict_pb(p, rows[p].token))
            p, removed = p + 1, removed + 1
        else:
            p += 1
    if n and data.draw(st.booleans()):
        ops.append(brightness_pb(data.draw(st.lists(st.floats(0, 255, width=32),
                                                    min_size=n, max_size=n))))  # fmt: skip
    ops = data.draw(st.permutations(ops))  # positions refer to the pre-patch rows: order is free
    position = n
    for j in range(data.draw(st.integers(0 if ops else 1, 2))):
        count = data.draw(st.integers(1, 4))
        tokens = data.draw(st.lists(st.integers(0, VOCAB - 1), min_size=count, max_size=count))
        ops.append(append_pb(position, tokens, seed + 100 + j, dtype))
        position += count
    if position - removed > hard:
        expect = Status.RESOURCE_EXHAUSTED
    if n and expect is None and data.draw(st.integers(0, 9)) == 0:
        p = data.draw(st.integers(0, n - 1))  # a token the client expects but is not there
        ops.append(evict_pb(p, (rows[p].token + 1) % VOCAB))
        expect = Status.FAILED_PRECONDITION if not any(
            (o.HasField("evict") and o.evict.position == p) or
            (o.HasField("replace_pair") and o.replace_pair.position in (p, p - 1)) for o in ops[:-1]
        ) else Status.INVALID_ARGUMENT  # fmt: skip
    return ops, expect


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_random_patches_match_the_reference_model(data):
    """The authority (canonical keys only) and a replica (rotated keys too), in any KV dtype,
    against the reference: same rows in the same slots, same mirror, keys exactly."""
    dtype = data.draw(st.sampled_from(DTYPES))
    hard = data.draw(st.sampled_from([4, HARD]))  # 4: 8 slots, rebases come soon
    engine = Engine()
    engine.create_session("s", tiny_geometry(dtype), Budget(hard, hard), None, lambda s: None)
    replica = Reference("s", hard, dtype=dtype)  # a worker's replica replaying the committed ops
    rows: list[Row] = []
    ledger, digest, offset = 0, GENESIS_DIGEST, 0
    ticking = data.draw(st.sampled_from([True, False]))
    for step in range(data.draw(st.integers(1, 20))):
        version = engine.read("s", lambda s: s.version) + 1
        ops, expect = draw_patch(data, rows, 1000 * step, dtype, hard, ticking)
        if expect is not None:
            with pytest.raises(PatchError) as err:
                engine.patch("s", version - 1, f"r{step}", ops)
            assert err.value.status is expect, err.value.message
        else:
            result = engine.patch("s", version - 1, f"r{step}", ops)
            digest = chain_digest(digest, version, ops)
            assert (result.version, result.digest) == (version, digest)
            new_offset = reference_offset(offset, len(rows), ops, 2 * hard)
            rows, ledger = reference_apply(rows, ledger, ops, version, offset)
            offset = new_offset
            replica.apply(ops)
        state = engine._sessions["s"].state
        assert state.rotated_keys is None  # the authority never holds rotated keys
        assert (state.digest, state.next_ledger_id) == (digest, ledger)
        check_against_reference(state, rows, offset)
        check_against_reference(replica.state, rows, offset)
        assert_same_state(state, replica.state)


def buffers_of(state: SessionState) -> list[torch.Tensor]:
    """Every buffer, whole (dead slots too), copied."""
    out = [state.canonical_keys, state.values, state.token_ids, state.origin_positions]
    out += [state.brightness] + ([state.rotated_keys] if state.rotated_keys is not None else [])
    return [t.clone() for t in out]


def scalars_of(state: SessionState) -> tuple:
    return (state.row_count, state.position_offset, state.version, state.digest,
            state.next_ledger_id, list(state.meta))  # fmt: skip


STEPS = ("move_slots", "write_rows", "write_brightness", "rederive_rotated")


def counting(calls: list[str], fail_at: int | None):
    """Patches for slots' primitives and check_blades that count calls and raise at one."""

    def wrap(module, name):
        real = getattr(module, name)

        def fake(*args, **kwargs):
            calls.append(name)
            if len(calls) == fail_at:
                raise RuntimeError("injected fault")
            return real(*args, **kwargs)

        return mock.patch.object(module, name, fake)

    return [wrap(slots, n) for n in STEPS] + [wrap(stage, "check_blades")]


def commit_counting(state, staged, digest, fail_at: int | None) -> list[str]:
    calls: list[str] = []
    patches = counting(calls, fail_at)
    for p in patches:
        p.start()
    try:
        commit_staged(state, staged, digest)
    finally:
        for p in reversed(patches):
            p.stop()
    return calls


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_a_failure_anywhere_in_a_commit_restores_every_slot_exactly(data):
    dtype = data.draw(st.sampled_from(DTYPES))
    hard = data.draw(st.sampled_from([4, HARD]))
    state = SessionState(
        "s", tiny_geometry(dtype), Budget(hard, hard), rotated=data.draw(st.booleans())
    )
    rows: list[Row] = []
    ledger = 0
    ticking = data.draw(st.booleans())
    for step in range(data.draw(st.integers(1, 12))):
        ops, expect = draw_patch(data, rows, 1000 * step, dtype, hard, ticking)
        if expect is not None:
            continue
        domain = ops_from_pb(ops)
        validate_ops(state, domain)
        staged = stage_ops(state, domain, state.version + 1)
        # How many primitive steps this commit takes, on a copy; then fail at one of them.
        total = len(commit_counting(copy.deepcopy(state), staged, b"d", None))
        fail_at = data.draw(st.integers(1, total))
        before, scalars = buffers_of(state), scalars_of(state)
        with pytest.raises(RuntimeError, match="injected"):
            commit_counting(state, staged, b"d", fail_at)
        assert scalars_of(state) == scalars
        assert all(torch.equal(a, b) for a, b in zip(before, buffers_of(state), strict=True))
        offset = state.position_offset
        commit_staged(state, staged, b"d")  # the same plan still commits afterwards
        rows, ledger = reference_apply(rows, ledger, ops, state.version, offset)
        check_against_reference(state, rows, state.position_offset)


def primed_state(n: int, hard: int, rotated: bool = False, tokens=None) -> SessionState:
    state = SessionState("s", tiny_geometry(), Budget(hard, hard), rotated=rotated)
    k, v = kv(n, seed=1)
    tokens = tuple(tokens or (i % VOCAB for i in range(n)))
    apply_ops(state, [AppendOp(0, tokens, k, v)], 1, b"")
    return state


@pytest.mark.parametrize("rotated", [False, True], ids=["authority", "replica"])
@pytest.mark.parametrize(
    "edit,position,moved",
    [("merge", 5, 5), ("evict", 5, 5), ("merge", 1994, 4), ("evict", 1994, 5)],
)
def test_an_edit_near_either_end_of_2000_rows_writes_o1_slots(rotated, edit, position, moved):
    """A merge or eviction moves only the shorter side: at row 5 of 2,000 rows the 5 rows before
    it, at row 1994 the rows after it; plus the new rows. The undo log holds only those."""
    state = primed_state(2000, 2000, rotated)
    tokens = state.live_token_ids()
    k, v = kv(1, seed=2)
    if edit == "merge":
        op = ReplacePairOp(position, tuple(tokens[position : position + 2]), 7, k, v)
    else:
        op = EvictOp(position, tokens[position])
    ops = [op, AppendOp(2000, (8,), k, v)]
    validate_ops(state, ops)
    stats = commit_staged(state, stage_ops(state, ops, 2), b"")
    new = 2 if edit == "merge" else 1
    assert stats.kv_slots_written == moved + new
    assert stats.saved_slots <= 6 * (moved + new)  # 5 carried buffers (+ rotated keys)
    assert state.position_offset == (1 if position == 5 else 0)


@pytest.mark.parametrize("position", [5, 40], ids=["head moves", "tail moves"])
def test_a_replica_rotates_a_merge_and_its_append_in_at_most_two_runs(position):
    """The moved side, the merged row and the appended row are re-rotated once the commit has
    written them, one rederive per run of adjacent slots (the tail case is one run), not one per
    write; every live rotated key is still one rotation of its canonical key."""
    state = primed_state(48, 48, rotated=True)
    tokens = state.live_token_ids()
    k, v = kv(1, seed=2)
    ops = [
        ReplacePairOp(position, tuple(tokens[position : position + 2]), 7, k, v),
        AppendOp(48, (8,), k, v),
    ]
    calls: list[tuple[int, int]] = []
    real = slots.rederive_rotated

    def counting(state, slot, count, undo):
        calls.append((slot, count))
        return real(state, slot, count, undo)

    with mock.patch.object(slots, "rederive_rotated", counting):
        apply_ops(state, ops, 2, b"")
    base, n = state.slot_range()[0], state.row_count
    assert len(calls) == (2 if position == 5 else 1)
    assert torch.equal(state.live_keys(), slots.rotated_slots(state, base, n))


def test_head_moves_raise_the_offset_until_a_rebase_brings_it_back():
    """Merging row 1 every tick (halo's pattern) moves the head each time; once the appended
    row would pass slot C = 2 * hard_max, the rows move back to slot 0."""
    hard = 8
    engine = Engine()
    engine.create_session("s", tiny_geometry(), Budget(hard, hard), 0.0, lambda s: None)
    engine.patch("s", 0, "", [append_pb(0, list(range(10, 10 + hard)), seed=1)])
    offsets = []
    for v in range(1, 14):
        rows = engine.read("s", lambda s: s.live_token_ids())
        engine.patch("s", v, "", [replace_pb(1, rows[1:3], 20 + v, seed=v),
                                  append_pb(hard, [35 + v], seed=100 + v)])  # fmt: skip
        offsets.append(engine.read("s", lambda s: s.position_offset))
    # Rows stay 8: head moves while offset + 8 + 1 <= 16, then a rebase to 0.
    assert offsets == [1, 2, 3, 4, 5, 6, 7, 8, 0, 1, 2, 3, 4]


def test_ties_move_the_tail():
    assert stage.moves_head(3, 2, 8) is False  # head 3, tail after the pair 3
    assert stage.moves_head(2, 2, 8) is True  # head 2, tail 4
    assert stage.moves_head(3, 1, 7) is False  # head 3, tail after the row 3


def _primed(n: int = 4):
    engine = Engine()
    engine.create_session("s", tiny_geometry(), Budget(8, 8), None, lambda s: None)
    engine.patch("s", 0, "", [append_pb(0, list(range(10, 10 + n)), seed=1)])
    return engine


BAD_OPS = [
    ("no ops", [], Status.INVALID_ARGUMENT),
    ("empty op", [session_pb2.PatchOp()], Status.INVALID_ARGUMENT),
    ("append elsewhere", [append_pb(2, [1], 0)], Status.FAILED_PRECONDITION),
    ("append negative", [append_pb(-4, [1], 0)], Status.INVALID_ARGUMENT),
    ("token >= vocab", [append_pb(4, [VOCAB], 0)], Status.INVALID_ARGUMENT),
    ("token < 0", [append_pb(4, [-1], 0)], Status.INVALID_ARGUMENT),
    ("over hard max", [append_pb(4, [1] * 5, 0)], Status.RESOURCE_EXHAUSTED),
    ("evict past end", [evict_pb(4, 13)], Status.INVALID_ARGUMENT),
    ("evict huge", [evict_pb(2**62, 13)], Status.INVALID_ARGUMENT),
    ("evict wrong token", [evict_pb(1, 12)], Status.FAILED_PRECONDITION),
    ("merge at last row", [replace_pb(3, [13, 0], 1, 0)], Status.INVALID_ARGUMENT),
    ("merge wrong tokens", [replace_pb(0, [10, 12], 1, 0)], Status.FAILED_PRECONDITION),
    ("merge one expected", [replace_pb(0, [10], 1, 0)], Status.INVALID_ARGUMENT),
    ("overlap", [replace_pb(0, [10, 11], 1, 0), evict_pb(1, 11)], Status.INVALID_ARGUMENT),
    ("evict twice", [evict_pb(1, 11), evict_pb(1, 11)], Status.INVALID_ARGUMENT),
    ("brightness count", [brightness_pb([1.0] * 3)], Status.FAILED_PRECONDITION),
    ("brightness NaN", [brightness_pb([1.0, float("nan"), 1.0, 1.0])], Status.INVALID_ARGUMENT),
    ("brightness twice", [brightness_pb([1.0] * 4)] * 2, Status.INVALID_ARGUMENT),
    ("merge NaN bright", [replace_pb(0, [10, 11], 1, 0, brightness=float("inf"))],
     Status.INVALID_ARGUMENT),
    # A valid op first: the later bad one must still stop the whole patch.
    ("valid then bad", [evict_pb(0, 10), append_pb(4, [VOCAB + 7], 0)], Status.INVALID_ARGUMENT),
]  # fmt: skip


@pytest.mark.parametrize("ops,status", [c[1:] for c in BAD_OPS], ids=[c[0] for c in BAD_OPS])
def test_bad_ops_get_their_status_and_change_nothing(ops, status):
    engine = _primed()
    before = state_to_snapshot(engine._sessions["s"].state)
    with pytest.raises(PatchError) as err:
        engine.patch("s", 1, "", ops)
    assert err.value.status is status, err.value.message
    assert state_to_snapshot(engine._sessions["s"].state) == before


def test_expected_tokens_are_checked_at_the_row_not_the_slot():
    engine = _primed(6)
    engine.patch("s", 1, "", [evict_pb(1, 11)])  # the head moves: offset 1
    assert engine.read("s", lambda s: (s.position_offset, s.live_token_ids())) == (
        1, [10, 12, 13, 14, 15])  # fmt: skip
    with pytest.raises(PatchError) as err:
        engine.patch("s", 2, "", [evict_pb(1, 11)])  # slot 1 holds 10, row 1 holds 12
    assert err.value.status is Status.FAILED_PRECONDITION
    engine.patch("s", 2, "", [evict_pb(1, 12)])


def test_new_rows_get_ledger_ids_in_op_order():
    engine = _primed()
    engine.patch("s", 1, "", [append_pb(4, [40, 41], 3), replace_pb(0, [10, 11], 30, 4)])
    mirror = engine._sessions["s"].state.meta
    assert [m.ledger_id for m in mirror] == [6, 2, 3, 4, 5]  # the append came first: 4, 5


@pytest.mark.parametrize("rotated", [False, True], ids=["authority", "replica"])
def test_snapshot_round_trips_every_field_and_the_offset(rotated):
    engine = _primed(6)
    engine.patch("s", 1, "a", [replace_pb(1, [11, 12], 7, 5), evict_pb(4, 14),
                               brightness_pb([3.5, 1.25, 2, 0, 9, 8])])  # fmt: skip
    engine.patch("s", 2, "b", [evict_pb(1, 7), append_pb(4, [1, 2, 3], 6, brightness=[1, 2, 3])])
    state = engine._sessions["s"].state
    assert state.position_offset == 2
    header, data = state_to_snapshot(state)
    assert header.session.position_offset == 2
    rebuilt = state_from_snapshot(header, data, rotated=rotated)
    assert_same_state(rebuilt, state)
    if rotated:
        n = state.row_count
        offsets = 2 + torch.arange(n) - state.live_origin_positions()
        want = rotate_keys(state.live_canonical_keys(), offsets, state.geometry.rope)
        assert torch.equal(rebuilt.live_keys(), want)
    with pytest.raises(ValueError):
        state_from_snapshot(header, data[:-1])
    header.session.position_offset = 2 * 8 - state.row_count + 1  # rows would pass slot C
    with pytest.raises(ValueError, match="offset"):
        state_from_snapshot(header, data)


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_replica_keeps_its_buffers_on_its_device_and_dtype(dtype):
    """Incoming op tensors are copied to the state's device and rotated there (CPU here; the
    same code runs on CUDA), and scratch slots past C are allocated and left alone."""
    state = SessionState("s", tiny_geometry(dtype), Budget(4, 4), rotated=True, device="cpu",
                         scratch_slots=3)  # fmt: skip
    assert state.rotated_keys is not None and state.capacity == 8
    assert state.rotated_keys.shape[2] == state.values.shape[2] == 8 + 3
    assert {t.device.type for t in (state.canonical_keys, state.values)} == {"cpu"}
    ops = ops_from_pb([append_pb(0, [1, 2, 3, 4], 1, dtype)])
    apply_ops(state, ops, 1, b"")
    ops = ops_from_pb([replace_pb(0, [1, 2], 9, 2, dtype), append_pb(4, [5], 3, dtype)])
    apply_ops(state, ops, 2, b"")
    assert state.live_keys().dtype == dtype and state.live_token_ids() == [9, 3, 4, 5]
    assert not state.rotated_keys[:, :, 8:].any() and not state.values[:, :, 8:].any()


@pytest.mark.parametrize("dtype", DTYPES)
def test_geometry_round_trips_through_proto(dtype):
    g = tiny_geometry(dtype)
    back = geometry_from_pb(geometry_to_pb(g))
    assert (back.num_layers, back.num_kv_heads, back.head_dim, back.dtype, back.vocab_size) == (
        g.num_layers, g.num_kv_heads, g.head_dim, g.dtype, g.vocab_size)  # fmt: skip
    assert torch.equal(back.rope.inv_freq, g.rope.inv_freq)


@settings(max_examples=60, deadline=None)
@given(
    dtype=st.sampled_from(DTYPES),
    n=st.integers(1, 40),
    specials=st.lists(
        st.tuples(st.integers(0, 39), st.sampled_from([math.nan, math.inf, -math.inf]))
    ),
)
def test_the_finite_check_agrees_with_isfinite(dtype, n, specials):
    """validate's one-reduction check refuses exactly the K/V isfinite() would, in every dtype."""
    t = torch.randn(2, 2, n, 8).to(dtype)
    for i, value in specials:
        t.view(-1)[i % t.numel()] = value
    assert validate._all_finite(t) == bool(torch.isfinite(t).all())
    b = t.float().abs().view(-1)  # brightness: non-negative unless NaN
    ok = bool(torch.isfinite(b).all()) and bool((b <= MAX_BRIGHTNESS).all())
    if ok:
        validate._check_finite(b, "x")
    else:
        with pytest.raises(PatchError):
            validate._check_finite(b, "x")
