"""The worker as a gRPC server beside a real (in-process) authority: health, reflection, auth,
metrics, the full read-only protocol, and a status code for every kind of bad request."""

from __future__ import annotations

import urllib.request

import grpc
import pytest
import torch
from worker_fixtures import (
    At,
    append_step,
    full_forward,
    health_status,
    prime_session,
    reflected_services,
    same,
    snapshot_of,
    stories,
    story_ids,
)

from cache_authority.server import AuthorityConfig, start_authority
from model_worker.server import SERVICE_NAME, WorkerConfig, start_worker
from positronic import codec
from positronic.rpc import open_channel, status_details
from positronic.v1 import cache_authority_pb2, cache_authority_pb2_grpc, model_worker_pb2_grpc
from positronic.v1 import model_worker_pb2 as pb

TOKEN = "s3cret"


@pytest.fixture(scope="module")
def services(stories260k_dir):
    authority = start_authority(AuthorityConfig(listen="127.0.0.1:0", auth_token=TOKEN))
    address = f"127.0.0.1:{authority.port}"
    worker = start_worker(
        WorkerConfig(
            model=str(stories260k_dir),
            authority=address,
            listen="127.0.0.1:0",
            device="cpu",
            auth_token=TOKEN,
            metrics_port=0,
        )
    )
    a_channel = open_channel(address, TOKEN)
    w_channel = open_channel(f"127.0.0.1:{worker.port}", TOKEN)
    yield (
        cache_authority_pb2_grpc.CacheAuthorityStub(a_channel),
        model_worker_pb2_grpc.ModelWorkerStub(w_channel),
        worker,
    )
    a_channel.close()
    w_channel.close()
    worker.stop(0)
    authority.stop(0)


@pytest.fixture(scope="module")
def session(services, stories260k_dir):
    """A session primed with the story's first 12 tokens (version 1)."""
    authority, worker, _ = services
    lm = stories(str(stories260k_dir))
    ids = story_ids(lm)
    info = worker.Info(pb.InfoRequest())
    at = prime_session(authority, worker, info.geometry, ids[:12], "story")
    return lm, ids, at


def _code(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as e:
        call()
    return e.value.code()


def test_health_reflection_and_auth(services):
    _, _, running = services
    address = f"127.0.0.1:{running.port}"
    assert health_status(address) == "SERVING"  # health stays open without the token
    assert health_status(address, SERVICE_NAME) == "SERVING"
    assert SERVICE_NAME == "positronic.v1.ModelWorker"
    assert SERVICE_NAME in reflected_services(address, TOKEN)
    with grpc.insecure_channel(address) as channel:  # no token
        stub = model_worker_pb2_grpc.ModelWorkerStub(channel)
        assert _code(lambda: stub.Info(pb.InfoRequest())) == grpc.StatusCode.UNAUTHENTICATED


def test_info_describes_the_model(services, stories260k_dir):
    _, worker, _ = services
    lm = stories(str(stories260k_dir))
    info = worker.Info(pb.InfoRequest())
    g = info.geometry
    assert (g.num_layers, g.num_kv_heads, g.head_dim) == (5, 4, 8)
    assert (g.vocab_size, g.max_position_embeddings) == (512, 512)
    assert g.dtype == codec.dtype_to_wire(torch.float32)
    assert g.model_fingerprint == lm.geometry.model_fingerprint and len(g.model_fingerprint) == 64
    assert g.rope.rope_type == "default" and g.rope.rope_theta == 10000.0
    torch.testing.assert_close(torch.tensor(list(g.rope.inv_freq)), lm.geometry.rope.inv_freq)
    assert info.special_tokens.bos_token_id == 1 and info.special_tokens.eos_token_id == 2
    assert info.special_tokens.pad_token_id == -1
    assert (info.repairer, info.device, info.num_attention_heads) == ("lm", "cpu", 8)


def test_tokenize_and_detokenize(services):
    _, worker, _ = services
    with_bos = worker.Tokenize(pb.TokenizeRequest(text="Once upon a time", add_bos=True))
    plain = worker.Tokenize(pb.TokenizeRequest(text="Once upon a time"))
    assert with_bos.ids[0] == 1 and list(with_bos.structural) == [True] + [False] * len(plain.ids)
    assert list(with_bos.ids[1:]) == list(plain.ids) and plain.ids[0] != 1
    assert list(plain.pieces) == ["▁Once", "▁upon", "▁a", "▁time"]
    out = worker.Detokenize(pb.DetokenizeRequest(ids=with_bos.ids, skip_special_tokens=True))
    assert out.text == " Once upon a time" and "".join(out.piece_texts) == out.text
    assert list(out.pieces) == list(with_bos.pieces) == ["<s>", *plain.pieces]
    assert list(out.piece_bytes) == [b"", b" Once", b" upon", b" a", b" time"]
    kept = worker.Detokenize(pb.DetokenizeRequest(ids=with_bos.ids))
    assert "".join(kept.piece_texts) == kept.text == "<s> Once upon a time"


def test_text_never_becomes_special_tokens_and_bytes_are_exact(services, stories260k_dir):
    """Issue 12: "a<s>b" was [261, 1, 430]; sentencepiece gives ▁a < s > b."""
    import sentencepiece as spm

    _, worker, _ = services
    sp = spm.SentencePieceProcessor(model_file=str(stories260k_dir / "tokenizer.model"))
    for text in ("a<s>b", "<s>", "</s>", "x</s><unk>  <pad>", "I like 🐱 cats"):
        got = worker.Tokenize(pb.TokenizeRequest(text=text))
        assert list(got.ids) == sp.encode(text) and not any(got.structural)
        assert list(got.pieces) == sp.encode(text, out_type=str)
        back = worker.Detokenize(pb.DetokenizeRequest(ids=got.ids))
        assert back.text == " " + text and b"".join(back.piece_bytes) == back.text.encode()
    cat = worker.Detokenize(pb.DetokenizeRequest(ids=sp.encode("I like 🐱 cats")))
    assert list(cat.piece_texts) == [" I", " li", "ke", " ", "", "", "", "🐱", " c", "at", "s"]
    assert list(cat.piece_bytes)[4:8] == [b"\xf0", b"\x9f", b"\x90", b"\xb1"]
    assert list(cat.pieces)[4:8] == ["<0xF0>", "<0x9F>", "<0x90>", "<0xB1>"]


def test_detokenize_is_linear_and_bounded(services, stories260k_dir):
    """20,000 ids used to take minutes (each piece decoded the whole prefix again): the text
    now comes from the table, without a single call of the tokenizer's decode."""
    _, worker, running = services
    ids = [(7 * i) % 509 + 3 for i in range(20_000)]
    lm = running.servicer.lm
    real_decode = lm.tokenizer.decode

    def no_decode(*args, **kwargs):
        raise AssertionError("Detokenize called tokenizer.decode")

    lm.tokenizer.decode = no_decode
    try:
        out = worker.Detokenize(pb.DetokenizeRequest(ids=ids), timeout=60)
    finally:
        lm.tokenizer.decode = real_decode
    assert len(out.pieces) == len(out.piece_bytes) == len(out.piece_texts) == 20_000
    assert out.text == lm.table.text_of(ids) == "".join(out.piece_texts)
    too_many = pb.DetokenizeRequest(ids=[3] * 65_537)
    assert _code(lambda: worker.Detokenize(too_many)) == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_steps_over_the_authoritys_session_equal_a_monolithic_forward(services, session):
    authority, worker, running = services
    lm, ids, at = session
    replicas = running.servicer.replicas
    for i in range(12, 16):
        step = worker.Step(
            pb.StepRequest(
                **at.names("story"),
                input_token_id=ids[i],
                top_logprobs=3,
                return_logits=True,
            )
        )
        want = full_forward(lm, ids[: i + 1]).logits[0, -1]
        torch.testing.assert_close(codec.decode(step.logits), want, atol=1e-4, rtol=0)
        assert step.position == i and len(step.attention) == i + 1
        assert step.next_token_id == int(torch.argmax(want))  # temperature 0: greedy
        assert step.top_logprobs[0].token_id == step.next_token_id
        at = append_step(authority, "story", at, ids[i], step)
    info = authority.GetSession(cache_authority_pb2.GetSessionRequest(session_id="story")).session
    worker.Step(pb.StepRequest(**at.names("story"), input_token_id=ids[16]))
    assert replicas.held("story").digest == info.digest  # the replica is the authority's


def test_no_rpc_changes_the_replica(services, session):
    _, worker, running = services
    _, ids, _ = session
    sid = "story"
    state = running.servicer.replicas.held(sid)
    at = At(state.version, state.digest)
    before = snapshot_of(state, live=True)
    n = state.row_count
    tokens = state.live_token_ids()
    worker.Step(pb.StepRequest(**at.names(sid), input_token_id=ids[3]))
    list(worker.Prefill(pb.PrefillRequest(**at.names(sid), token_ids=ids[:5])))
    list(worker.Prefill(pb.PrefillRequest(**at.names(sid), token_ids=ids[:5], start_position=4)))
    worker.ComputeKV(
        pb.ComputeKVRequest(
            **at.names(sid),
            insertions=[pb.Insertion(position=3, token_id=ids[9]), pb.Insertion(position=n)],
        )
    )
    repair = worker.Repair(
        pb.RepairRequest(
            **at.names(sid),
            pairs=[pb.PairRef(position=5, expected_token_ids=tokens[5:7])],
            max_candidates=4,
        )
    )
    assert len(repair.repairs[0].candidates) == 4
    for repair_params in (
        pb.RepairParams(repairer=pb.REPAIRER_LM),
        pb.RepairParams(repairer=pb.REPAIRER_KV_MERGE),
    ):
        ticked = worker.Tick(
            pb.TickRequest(
                **at.names(sid),
                input_token_id=ids[3],
                merges=[pb.PairRef(position=5, expected_token_ids=tokens[5:7])],
                repair=repair_params,
            )
        )
        assert ticked.merges[0].merged
    assert same(before, snapshot_of(running.servicer.replicas.held(sid), live=True))


def test_bad_requests_get_specific_codes(services, session):
    authority, worker, _ = services
    _, ids, _ = session
    sid = "story"
    get = cache_authority_pb2.GetSessionRequest(session_id=sid)
    info = authority.GetSession(get).session
    v, digest = info.version, info.digest
    C = grpc.StatusCode

    def step(**kw):
        request = {"session_id": sid, "version": v, "expected_digest": digest, **kw}
        return lambda: worker.Step(pb.StepRequest(**request))

    assert _code(step(input_token_id=512)) == C.INVALID_ARGUMENT
    assert _code(step(input_token_id=-1, version=0)) == C.INVALID_ARGUMENT  # malformed > stale
    assert _code(step(input_token_id=3, sampling=pb.SamplingParams(top_p=2))) == C.INVALID_ARGUMENT
    assert _code(step(session_id="nope", input_token_id=3)) == C.NOT_FOUND
    with pytest.raises(grpc.RpcError) as e:
        worker.Step(
            pb.StepRequest(session_id=sid, version=10**6, expected_digest=digest, input_token_id=3)
        )
    assert e.value.code() == C.ABORTED
    (detail,) = status_details(e.value)
    conflict = cache_authority_pb2.VersionConflict()
    assert detail.Unpack(conflict) and conflict.expected_version == 10**6
    assert _code(step(version=0, input_token_id=3)) == C.ABORTED  # the replica is past 0
    held = conflict.current_version
    assert held == v
    at = {"session_id": sid, "version": held, "expected_digest": digest}
    bad_pair = pb.PairRef(position=2, expected_token_ids=[ids[2], ids[2] + 1])
    repair = pb.RepairRequest(**at, pairs=[bad_pair])
    assert _code(lambda: worker.Repair(repair)) == C.FAILED_PRECONDITION
    far = pb.ComputeKVRequest(**at, insertions=[pb.Insertion(position=10**4, token_id=3)])
    assert _code(lambda: worker.ComputeKV(far)) == C.INVALID_ARGUMENT
    prefill = pb.PrefillRequest(**at, token_ids=[3], start_position=10**4)
    assert _code(lambda: list(worker.Prefill(prefill))) == C.INVALID_ARGUMENT
    too_long = pb.PrefillRequest(**at, token_ids=[3] * 600)
    assert _code(lambda: list(worker.Prefill(too_long))) == C.RESOURCE_EXHAUSTED
    bad_ids = pb.DetokenizeRequest(ids=[-1])
    assert _code(lambda: worker.Detokenize(bad_ids)) == C.INVALID_ARGUMENT

    def tick(**kw):
        return lambda: worker.Tick(pb.TickRequest(**{**at, "input_token_id": 3, **kw}))

    pair = pb.PairRef(position=2, expected_token_ids=ids[2:4])
    assert _code(tick(merges=[bad_pair])) == C.FAILED_PRECONDITION
    assert _code(tick(merges=[pair, pair])) == C.INVALID_ARGUMENT  # overlapping pairs
    assert _code(tick(input_token_id=512)) == C.INVALID_ARGUMENT
    assert _code(tick(repair=pb.RepairParams(repairer=99))) == C.INVALID_ARGUMENT
    assert _code(tick(repair=pb.RepairParams(max_candidates=101))) == C.RESOURCE_EXHAUSTED
    mlm = pb.RepairParams(repairer=pb.REPAIRER_MLM)
    assert _code(tick(merges=[pair], repair=mlm)) == C.FAILED_PRECONDITION  # no masked LM
    weighted = pb.PairRef(position=2, expected_token_ids=ids[2:4], weights=[1.0, -1.0])
    kv = pb.RepairParams(repairer=pb.REPAIRER_KV_MERGE)
    assert _code(tick(merges=[weighted], repair=kv)) == C.INVALID_ARGUMENT
    assert _code(tick(version=10**6)) == C.ABORTED
    assert _code(tick(session_id="nope")) == C.NOT_FOUND


def test_compute_calls_require_the_digest(services, session):
    """Issue 12: with expected_digest unset, a re-created session id was computed on with the
    deleted session's rows. Every compute call must name it."""
    _, worker, running = services
    _, ids, _ = session
    state = running.servicer.replicas.held("story")
    C = grpc.StatusCode
    for digest, code in ((b"", C.INVALID_ARGUMENT), (b"x" * 31, C.INVALID_ARGUMENT)):
        at = {"session_id": "story", "version": state.version, "expected_digest": digest}
        calls = [
            lambda at=at: worker.Step(pb.StepRequest(**at, input_token_id=3)),
            lambda at=at: list(worker.Prefill(pb.PrefillRequest(**at, token_ids=[3]))),
            lambda at=at: worker.ComputeKV(
                pb.ComputeKVRequest(**at, insertions=[pb.Insertion(position=1, token_id=3)])
            ),
            lambda at=at: worker.Repair(
                pb.RepairRequest(**at, pairs=[pb.PairRef(position=1, expected_token_ids=ids[1:3])])
            ),
            lambda at=at: worker.Tick(pb.TickRequest(**at, input_token_id=3)),
        ]
        assert [_code(call) for call in calls] == [code] * 5


def test_metrics_endpoint(services, session):
    _, _, running = services
    url = f"http://127.0.0.1:{running.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as resp:
        text = resp.read().decode()
    assert "positronic_worker_step_seconds_count" in text
    assert 'positronic_worker_sync_bytes_total{kind="snapshot"}' in text
    assert "positronic_worker_tokens_per_second" in text


def test_a_model_that_fails_to_load_is_not_serving(tmp_path):
    running = start_worker(
        WorkerConfig(model=str(tmp_path / "missing"), authority="127.0.0.1:1", listen="127.0.0.1:0")
    )
    try:
        address = f"127.0.0.1:{running.port}"
        assert health_status(address) == "NOT_SERVING"
        assert SERVICE_NAME in reflected_services(address)
        with grpc.insecure_channel(address) as channel:
            stub = model_worker_pb2_grpc.ModelWorkerStub(channel)
            assert _code(lambda: stub.Info(pb.InfoRequest())) == grpc.StatusCode.UNAVAILABLE
    finally:
        running.stop(0)


@pytest.mark.parametrize(
    "bad",
    [
        {"model": ""},
        {"listen": "nowhere"},
        {"repair": "magic"},
        {"repair": "mlm"},
        {"device": "tpu"},
        {"dtype": "int8"},
        {"metrics_port": 70000},
    ],
)
def test_worker_config_is_validated(bad):
    with pytest.raises(ValueError):
        WorkerConfig(**{"model": "m", **bad})


def test_bugs_are_internal_and_logged(caplog):
    """An in-process worker on an injected model, repairer and sync source; a repairer that
    crashes is a bug: INTERNAL, with its traceback in the log."""
    from worker_fixtures import MiniAuthority, append_op, tiny_llama

    class Broken:
        name = "broken"

        def candidates(self, rows, position, max_candidates):
            raise RuntimeError("boom")

    lm = tiny_llama()
    mini = MiniAuthority()
    mini.create(lm, "s")
    version = mini.patch("s", [append_op(lm, [1, 5, 6, 7, 8])])
    running = start_worker(
        WorkerConfig(model="tiny", listen="127.0.0.1:0"),
        model=lm,
        repairer=Broken(),
        sync_source=mini,
    )
    try:
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub = model_worker_pb2_grpc.ModelWorkerStub(channel)
            at = At(version, mini.states["s"].digest)
            step = stub.Step(pb.StepRequest(**at.names(), input_token_id=9))
            assert step.position == 5 and len(step.attention) == 6
            request = pb.RepairRequest(
                **at.names(),
                pairs=[pb.PairRef(position=1, expected_token_ids=[5, 6])],
            )
            assert _code(lambda: stub.Repair(request)) == grpc.StatusCode.INTERNAL
        assert any(r.exc_info and "Repair failed" in r.getMessage() for r in caplog.records)
    finally:
        running.stop(0)


def test_tick_is_step_plus_the_merges_in_one_call(services, session):
    """Over gRPC: the Tick's step equals Step's, its text is the token table's, and each merge
    comes back with its replacement's K/V (lm, pair_lm: two forwards; K/V merge: one); the
    adjacent similarity comes back only when asked, one value per row."""
    _, worker, running = services
    lm, ids, _ = session
    state = running.servicer.replicas.held("story")
    at = At(state.version, state.digest)
    tokens = state.live_token_ids()
    n = len(tokens)
    step = worker.Step(pb.StepRequest(**at.names("story"), input_token_id=ids[n]))
    plain = worker.Tick(pb.TickRequest(**at.names("story"), input_token_id=ids[n]))
    assert (plain.next_token_id, plain.position, plain.forwards) == (step.next_token_id, n, 1)
    assert plain.next_token_piece == lm.table.pieces[plain.next_token_id]
    assert plain.next_token_bytes == lm.table.text_bytes[plain.next_token_id]
    torch.testing.assert_close(list(plain.attention), list(step.attention))
    assert codec.decode(plain.input_kv.keys).equal(codec.decode(step.input_kv.keys))
    pairs = [pb.PairRef(position=3, expected_token_ids=tokens[3:5])]
    assert list(plain.adjacent_similarity) == []
    similar = worker.Tick(
        pb.TickRequest(**at.names("story"), input_token_id=ids[n], adjacent_similarity=True)
    )
    assert len(similar.adjacent_similarity) == n and similar.next_token_id == plain.next_token_id
    assert all(-1.0001 <= v <= 1.0001 for v in similar.adjacent_similarity)
    kinds = ((pb.REPAIRER_LM, 2), (pb.REPAIRER_KV_MERGE, 1), (pb.REPAIRER_PAIR_LM, 2))
    for repairer, forwards in kinds:
        merged = worker.Tick(
            pb.TickRequest(
                **at.names("story"),
                input_token_id=ids[n],
                merges=pairs,
                repair=pb.RepairParams(repairer=repairer),
            )
        )
        assert merged.forwards == forwards and merged.next_token_id == plain.next_token_id
        (m,) = merged.merges
        assert m.merged and m.position == 3 and m.piece == lm.table.pieces[m.token_id]
        assert codec.decode(m.kv.keys).shape == (5, 4, 1, 8)
        assert m.replaced_text == lm.table.text_of(tokens[3:5])
        if repairer == pb.REPAIRER_PAIR_LM:
            assert m.token_id in tokens[3:5]


def test_info_and_list_policies(services):
    _, worker, _ = services
    info = worker.Info(pb.InfoRequest())
    assert list(info.repairers) == [pb.REPAIRER_LM, pb.REPAIRER_KV_MERGE, pb.REPAIRER_PAIR_LM]
    policies = {p.name: p for p in worker.ListPolicies(pb.ListPoliciesRequest()).policies}
    from positronic.policies import POLICIES

    assert list(policies) == sorted(POLICIES)
    old = policies["halo-lm"]  # the default before the merging search
    assert old.merges and old.repair.repairer == pb.REPAIRER_UNSPECIFIED
    assert old.params["sinks"] == 4 and old.params["params.gain"] == 0
    for name in ("halo", "halo-kv"):  # the default: K/V merges, the heavier row's key
        kv = policies[name]
        assert kv.merges and kv.repair.repairer == pb.REPAIRER_KV_MERGE
        assert kv.repair.kv_key == pb.KV_MERGE_KEY_HEAVIER
        assert kv.params["sinks"] == 0 and kv.params["params.gain"] == 30
    assert not policies["streaming"].merges and policies["streaming"].description
    assert policies["halo-pair"].repair.repairer == pb.REPAIRER_PAIR_LM
    for name in ("halo-redundant", "halo-balanced"):  # K/V merges, equal weights, mean key
        r = policies[name].repair
        assert (r.repairer, r.kv_weights, r.kv_key) == (
            pb.REPAIRER_KV_MERGE,
            pb.KV_MERGE_WEIGHTS_EQUAL,
            pb.KV_MERGE_KEY_MEAN,
        )
    assert policies["halo-redundant"].params["recent_window"] == 32
    assert policies["halo-balanced"].params["cap"] == 2


def test_a_deleted_session_answers_not_found_and_a_recreated_one_has_its_own_rows(
    services, stories260k_dir
):
    """The worker follows the session; DeleteSession ends the follow stream with NOT_FOUND and
    the replica is dropped, so a Tick at the old version and digest answers NOT_FOUND within a
    bounded time (and keeps answering it); the id re-created with another prompt is computed on
    its own rows."""
    import time

    authority, worker, running = services
    lm = stories(str(stories260k_dir))
    ids = story_ids(lm)
    info = worker.Info(pb.InfoRequest())
    at = prime_session(authority, worker, info.geometry, ids[:10], "gone")
    old = pb.TickRequest(**at.names("gone"), input_token_id=ids[10])
    worker.Tick(old)
    assert running.servicer.replicas.following("gone")
    authority.DeleteSession(cache_authority_pb2.DeleteSessionRequest(session_id="gone"))
    deadline = time.monotonic() + 10
    while True:
        try:
            worker.Tick(old)  # the follower has not seen the deletion yet
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.NOT_FOUND
            break
        assert time.monotonic() < deadline, "the deleted session is still computed on"
        time.sleep(0.01)
    for _ in range(3):
        assert _code(lambda: worker.Tick(old)) == grpc.StatusCode.NOT_FOUND
    other = ids[11:19]
    again = prime_session(authority, worker, info.geometry, other, "gone")
    fresh = worker.Tick(pb.TickRequest(**again.names("gone"), input_token_id=ids[19]))
    want = full_forward(lm, [*other, ids[19]]).logits[0, -1]
    assert fresh.next_token_id == int(torch.argmax(want))
    assert _code(lambda: worker.Tick(old)) == grpc.StatusCode.ABORTED  # another history
