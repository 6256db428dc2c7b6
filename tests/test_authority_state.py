"""The patch engine against a plain-Python reference model of rows and mirror (hypothesis), plus
the status each kind of bad op gets, and conversions that must round-trip exactly."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cache_authority import stage
from cache_authority.convert import geometry_from_pb, geometry_to_pb
from cache_authority.engine import Engine
from cache_authority.ops import GENESIS_DIGEST, PatchError, Status, chain_digest
from cache_authority.rows import Budget
from cache_authority.snapshot import state_from_snapshot, state_to_snapshot
from positronic import codec
from positronic.rope import rotate_keys
from positronic.v1 import session_pb2
from tests.authority_fixtures import (
    VOCAB,
    Reference,
    append_pb,
    assert_same_state,
    brightness_pb,
    evict_pb,
    replace_pb,
    tiny_geometry,
)

HARD = 12
MERGED = session_pb2.TOKEN_SOURCE_MERGED


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


def reference_apply(rows: list[Row], ledger: int, ops, version: int) -> tuple[list[Row], int]:
    """The contract, written the simple way: positions name pre-patch rows; new rows get ledger
    ids in op order; survivors keep their order; appended rows go last."""
    new_rows: dict[int, list[Row]] = {}
    for i, op in enumerate(ops):
        kind = op.WhichOneof("op")
        if kind == "append":
            a = op.append
            k, v = codec.decode(a.kv.keys), codec.decode(a.kv.values)
            new_rows[i] = [
                Row(t, k[:, :, j], v[:, :, j], a.position + j,
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
            new_rows[i] = [Row(r.token_id, k[:, :, 0], v[:, :, 0], r.position, bright, ledger,
                               MERGED, r.piece, version, replaced)]  # fmt: skip
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


def check_against_reference(state, rows: list[Row]) -> None:
    assert state.row_count == len(rows) == len(state.meta)
    assert state.live_token_ids() == [r.token for r in rows]
    assert state.origin_positions[: len(rows)].tolist() == [r.origin for r in rows]
    expected_b = torch.tensor([r.brightness for r in rows], dtype=torch.float32)
    assert torch.equal(state.brightness[: len(rows)], expected_b)
    for i, (m, r) in enumerate(zip(state.meta, rows, strict=True)):
        assert (m.ledger_id, m.source, m.piece, m.origin_position, m.created_version) == (
            r.ledger, r.source, r.piece, r.origin, r.created), i  # fmt: skip
        assert (m.replaced_ledger_ids, m.replaced_token_ids) == r.replaced
    if rows:
        ckeys = torch.stack([r.ckey for r in rows], dim=2)
        assert torch.equal(state.live_canonical_keys(), ckeys)
        assert torch.equal(state.live_values(), torch.stack([r.value for r in rows], dim=2))
        # Every row's key is ONE rotation of its canonical key by (index - origin).
        offsets = torch.arange(len(rows)) - torch.tensor([r.origin for r in rows])
        rotated = rotate_keys(ckeys, offsets, state.geometry.rope)
        torch.testing.assert_close(state.live_keys(), rotated, rtol=1e-6, atol=1e-6)


def draw_patch(data, rows: list[Row], seed: int):
    """Ops for one patch against `rows`, and the status expected (None: it must commit)."""
    n = len(rows)
    ops, expect, p, removed = [], None, 0, 0
    while p < n:
        choice = data.draw(st.sampled_from(["keep", "keep", "evict", "merge"]))
        if choice == "merge" and p + 1 < n:
            ops.append(replace_pb(p, [rows[p].token, rows[p + 1].token],
                                  data.draw(st.integers(0, VOCAB - 1)), seed + p,
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
        ops.append(append_pb(position, tokens, seed + 100 + j))
        position += count
    if position - removed > HARD:
        expect = Status.RESOURCE_EXHAUSTED
    if n and expect is None and data.draw(st.integers(0, 9)) == 0:
        p = data.draw(st.integers(0, n - 1))  # a token the client expects but is not there
        ops.append(evict_pb(p, (rows[p].token + 1) % VOCAB))
        expect = Status.FAILED_PRECONDITION if not any(
            (o.HasField("evict") and o.evict.position == p) or
            (o.HasField("replace_pair") and o.replace_pair.position in (p, p - 1)) for o in ops[:-1]
        ) else Status.INVALID_ARGUMENT  # fmt: skip
    return ops, expect


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_random_patches_match_the_reference_model(data):
    engine = Engine()
    engine.create_session("s", tiny_geometry(), Budget(HARD, HARD), None, lambda s: None)
    replica = Reference("s", HARD)  # a worker-style replica replaying the committed ops
    rows: list[Row] = []
    ledger, digest = 0, GENESIS_DIGEST
    for step in range(data.draw(st.integers(1, 8))):
        version = engine.read("s", lambda s: s.version) + 1
        ops, expect = draw_patch(data, rows, seed=1000 * step)
        if expect is not None:
            with pytest.raises(PatchError) as err:
                engine.patch("s", version - 1, f"r{step}", ops)
            assert err.value.status is expect, err.value.message
        else:
            result = engine.patch("s", version - 1, f"r{step}", ops)
            digest = chain_digest(digest, version, ops)
            assert (result.version, result.digest) == (version, digest)
            rows, ledger = reference_apply(rows, ledger, ops, version)
            replica.apply(ops)
        state = engine._sessions["s"].state
        assert (state.digest, state.next_ledger_id) == (digest, ledger)
        check_against_reference(state, rows)
        assert_same_state(state, replica.state)


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


def test_new_rows_get_ledger_ids_in_op_order():
    engine = _primed()
    engine.patch("s", 1, "", [append_pb(4, [40, 41], 3), replace_pb(0, [10, 11], 30, 4)])
    mirror = engine._sessions["s"].state.meta
    assert [m.ledger_id for m in mirror] == [6, 2, 3, 4, 5]  # the append came first: 4, 5


def test_snapshot_round_trips_every_field():
    engine = _primed(6)
    engine.patch("s", 1, "a", [replace_pb(1, [11, 12], 7, 5), evict_pb(4, 14),
                               brightness_pb([3.5, 1.25, 2, 0, 9, 8])])  # fmt: skip
    engine.patch("s", 2, "b", [evict_pb(3, 15), append_pb(4, [1, 2, 3], 6, brightness=[1, 2, 3])])
    state = engine._sessions["s"].state
    rebuilt = state_from_snapshot(*state_to_snapshot(state))
    assert_same_state(rebuilt, state)
    header, data = state_to_snapshot(state)
    with pytest.raises(ValueError):
        state_from_snapshot(header, data[:-1])


def test_a_snapshot_rebuild_rotates_moved_rows_with_the_function_patches_use(monkeypatch):
    engine = _primed(6)
    engine.patch("s", 1, "a", [replace_pb(1, [11, 12], 7, 5), evict_pb(3, 13)])  # rows moved
    state = engine._sessions["s"].state
    calls = []
    monkeypatch.setattr(stage, "rerotate_from_canonical", spy(stage.rerotate_from_canonical, calls))
    rebuilt = state_from_snapshot(*state_to_snapshot(state))
    assert len(calls) == 1  # the rotation stage.py applies, written once (invariant 5)
    assert_same_state(rebuilt, state)


def spy(fn, calls: list):
    def wrapper(*args, **kwargs):
        calls.append(args)
        return fn(*args, **kwargs)

    return wrapper


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_geometry_round_trips_through_proto(dtype):
    g = tiny_geometry(dtype)
    back = geometry_from_pb(geometry_to_pb(g))
    assert (back.num_layers, back.num_kv_heads, back.head_dim, back.dtype, back.vocab_size) == (
        g.num_layers, g.num_kv_heads, g.head_dim, g.dtype, g.vocab_size)  # fmt: skip
    assert torch.equal(back.rope.inv_freq, g.rope.inv_freq)
