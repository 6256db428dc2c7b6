"""Hostile requests to every ModelWorker RPC, over gRPC, against a real worker (stories260K) and
a real authority with one primed session: whatever a client sends, the answer is a result or a
specific status, never INTERNAL or UNKNOWN (issue 12)."""

from __future__ import annotations

import grpc
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context
from worker_fixtures import At, prime_session, stories, story_ids

from cache_authority.server import AuthorityConfig, start_authority
from model_worker.server import WorkerConfig, start_worker
from positronic.rpc import open_channel
from positronic.v1 import cache_authority_pb2_grpc, model_worker_pb2_grpc
from positronic.v1 import model_worker_pb2 as pb

pytestmark = pytest.mark.timeout(300)

BUGS = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}
FUZZ = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
SID = "fuzzed"


@pytest.fixture(scope="module")
def world(stories260k_dir):
    """(worker stub, the primed session's committed state, its token ids)."""
    authority = start_authority(AuthorityConfig(listen="127.0.0.1:0"))
    address = f"127.0.0.1:{authority.port}"
    worker = start_worker(
        WorkerConfig(
            model=str(stories260k_dir), authority=address, listen="127.0.0.1:0", device="cpu"
        )
    )
    a_channel = open_channel(address)
    w_channel = open_channel(f"127.0.0.1:{worker.port}")
    stub = model_worker_pb2_grpc.ModelWorkerStub(w_channel)
    ids = story_ids(stories(str(stories260k_dir)))[:12]
    geometry = stub.Info(pb.InfoRequest()).geometry
    auth = cache_authority_pb2_grpc.CacheAuthorityStub(a_channel)
    at = prime_session(auth, stub, geometry, ids, SID)
    yield stub, at, ids, w_channel
    a_channel.close()
    w_channel.close()
    worker.stop(0)
    authority.stop(0)


def answered(call) -> grpc.StatusCode:
    """OK or the status code; the call's result is consumed (streams too). The codes seen are
    hypothesis events (pytest --hypothesis-show-statistics)."""
    why = ""
    try:
        out = call()
        if hasattr(out, "__next__"):
            list(out)
        code = grpc.StatusCode.OK
    except grpc.RpcError as e:
        code = e.code()  # type: ignore[attr-defined]
        why = (e.details() or "")[:24]  # type: ignore[attr-defined]
    if currently_in_test_context():
        event(f"{code.name} {why}")
    return code


INT64 = st.one_of(
    st.integers(-3, 40),
    st.sampled_from([-(2**63), 2**63 - 1, 2**31, -(2**31), 511, 512, 10**6]),
)
INT32 = st.one_of(st.integers(-3, 300), st.sampled_from([-(2**31), 2**31 - 1]))
FLOATS = st.one_of(
    st.floats(width=32, allow_nan=True, allow_infinity=True),
    st.sampled_from([1e-38, 1e-45, -0.0, 0.01, 100.0, 100.5, 3e38]),
)
TEXT = st.one_of(st.text(max_size=40), st.sampled_from(["", "a<s>b", "</s>" * 50, "🐱" * 20]))
SESSION = st.one_of(st.text(max_size=20), st.just("x" * 20_000), st.just("nope"))
IDS = st.lists(INT64, max_size=20)
TOKEN = st.integers(0, 511)


def mostly(valid: st.SearchStrategy, hostile: st.SearchStrategy) -> st.SearchStrategy:
    """Four times in five a valid value (so calls get past validation to the replica and the
    model), else a hostile one."""
    return st.one_of(valid, valid, valid, valid, hostile)


def names(at: At) -> st.SearchStrategy[dict]:
    """Session, version and digest."""
    hostile = st.fixed_dictionaries(
        {
            "session_id": mostly(st.just(SID), SESSION),
            "version": mostly(st.just(at.version), INT64),
            "expected_digest": st.one_of(
                st.just(at.digest), st.binary(max_size=40), st.just(b"\0" * 32)
            ),
        }
    )
    return mostly(st.just(at.names(SID)), hostile)


def valid_sampling() -> st.SearchStrategy[pb.SamplingParams]:
    """Anywhere within the documented ranges (float32, as on the wire)."""
    return st.builds(
        pb.SamplingParams,
        temperature=st.one_of(st.just(0.0), st.floats(1.401298464324817e-45, 100.0, width=32)),
        top_k=st.integers(0, 600),
        top_p=st.floats(0.0, 1.0, width=32),
        repetition_penalty=st.one_of(
            st.just(0.0), st.floats(0.009999999776482582, 100.0, width=32)
        ),
        seed=st.integers(0, 2**64 - 1),
    )


def sampling() -> st.SearchStrategy[pb.SamplingParams]:
    hostile = st.builds(
        pb.SamplingParams,
        temperature=FLOATS,
        top_k=INT32,
        top_p=FLOATS,
        repetition_penalty=FLOATS,
        seed=st.integers(0, 2**64 - 1),
    )
    return mostly(valid_sampling(), hostile)


@FUZZ
@given(data=st.data())
def test_tokenize_and_detokenize_never_fail_internally(world, data):
    stub = world[0]
    text = data.draw(TEXT)
    assert answered(lambda: stub.Tokenize(pb.TokenizeRequest(text=text, add_bos=True))) not in BUGS
    ids = data.draw(mostly(st.lists(TOKEN, max_size=200), IDS))
    skip = data.draw(st.booleans())
    request = pb.DetokenizeRequest(ids=ids, skip_special_tokens=skip)
    assert answered(lambda: stub.Detokenize(request)) not in BUGS


@FUZZ
@given(data=st.data())
def test_step_never_fails_internally(world, data):
    stub, at, _, _ = world
    request = pb.StepRequest(
        **data.draw(names(at)),
        input_token_id=data.draw(mostly(TOKEN, INT64)),
        sampling=data.draw(sampling()),
        top_logprobs=data.draw(mostly(st.integers(0, 100), INT32)),
        attention_reduction=data.draw(mostly(st.integers(0, 3), st.integers(-9, 9))),
        return_logits=data.draw(st.booleans()),
    )
    if data.draw(st.booleans()):
        request.forced_next_token_id = data.draw(mostly(TOKEN, INT64))
    assert answered(lambda: stub.Step(request)) not in BUGS


@FUZZ
@given(data=st.data())
def test_step_within_the_documented_ranges_always_answers(world, data):
    """Any sampling within the ranges of model_worker.proto draws a token (temperature 1e-45,
    penalty 0.01 and 100, top_k past the vocabulary...)."""
    stub, at, _, _ = world
    request = pb.StepRequest(
        **at.names(SID),
        input_token_id=data.draw(TOKEN),
        sampling=data.draw(valid_sampling()),
        top_logprobs=data.draw(st.integers(0, 100)),
        attention_reduction=data.draw(st.integers(0, 3)),
    )
    assert answered(lambda: stub.Step(request)) == grpc.StatusCode.OK


@FUZZ
@given(data=st.data())
def test_prefill_and_compute_kv_never_fail_internally(world, data):
    stub, at, _, _ = world
    prefill = pb.PrefillRequest(
        **data.draw(names(at)),
        token_ids=data.draw(mostly(st.lists(TOKEN, min_size=1, max_size=20), IDS)),
        start_position=data.draw(mostly(st.integers(0, 12), INT64)),
        chunk_tokens=data.draw(mostly(st.integers(0, 8), INT64)),
    )
    assert answered(lambda: stub.Prefill(prefill)) not in BUGS
    insertion = st.builds(
        pb.Insertion, position=mostly(st.integers(0, 12), INT64), token_id=mostly(TOKEN, INT64)
    )
    compute = pb.ComputeKVRequest(
        **data.draw(names(at)), insertions=data.draw(st.lists(insertion, max_size=4))
    )
    assert answered(lambda: stub.ComputeKV(compute)) not in BUGS


@FUZZ
@given(data=st.data())
def test_repair_never_fails_internally(world, data):
    stub, at, ids, _ = world
    pair = st.integers(0, 11).map(
        lambda p: pb.PairRef(position=p, expected_token_ids=ids[p : p + 2])
    )
    hostile = st.builds(
        pb.PairRef,
        position=INT64,
        expected_token_ids=st.lists(INT64, max_size=3),
        weights=st.lists(FLOATS, max_size=3),
    )
    request = pb.RepairRequest(
        **data.draw(names(at)),
        pairs=data.draw(st.lists(mostly(pair, hostile), max_size=3)),
        max_candidates=data.draw(mostly(st.integers(0, 20), INT32)),
    )
    assert answered(lambda: stub.Repair(request)) not in BUGS


@FUZZ
@given(data=st.data())
def test_tick_and_list_policies_never_fail_internally(world, data):
    stub, at, _, _ = world
    merges = st.lists(st.builds(pb.PairRef, position=INT64), max_size=3)
    request = pb.TickRequest(
        **data.draw(names(at)),
        input_token_id=data.draw(INT64),
        sampling=data.draw(sampling()),
        merges=data.draw(merges),
    )
    assert answered(lambda: stub.Tick(request)) not in BUGS
    assert answered(lambda: stub.ListPolicies(pb.ListPoliciesRequest())) not in BUGS
    assert answered(lambda: stub.Info(pb.InfoRequest())) not in BUGS


def test_the_issues_requests_and_huge_fields(world):
    """The reported cases and every limit, one past it."""
    stub, at, ids, _ = world
    C = grpc.StatusCode
    real = at.names(SID)

    def step(**sampling_kw):
        request = pb.StepRequest(
            **real, input_token_id=ids[-1], sampling=pb.SamplingParams(**sampling_kw)
        )
        return answered(lambda: stub.Step(request))

    assert step(temperature=1e-38) == C.OK  # computed robustly: greedy in effect
    assert step(temperature=1e-38, top_k=5) == C.OK
    assert step(repetition_penalty=1e-45) == C.INVALID_ARGUMENT  # outside [0.01, 100]
    assert step(temperature=float("nan")) == C.INVALID_ARGUMENT
    too_many = {
        "ids": lambda: stub.Detokenize(pb.DetokenizeRequest(ids=[3] * 65_537)),
        "text": lambda: stub.Tokenize(pb.TokenizeRequest(text="a" * (1 << 20 | 1))),
        "prefill": lambda: stub.Prefill(pb.PrefillRequest(**real, token_ids=[3] * 65_537)),
        "insertions": lambda: stub.ComputeKV(
            pb.ComputeKVRequest(**real, insertions=[pb.Insertion(position=1, token_id=3)] * 257)
        ),
        "pairs": lambda: stub.Repair(
            pb.RepairRequest(
                **real, pairs=[pb.PairRef(position=1, expected_token_ids=ids[1:3])] * 257
            )
        ),
        "candidates": lambda: stub.Repair(
            pb.RepairRequest(
                **real,
                pairs=[pb.PairRef(position=1, expected_token_ids=ids[1:3])],
                max_candidates=101,
            )
        ),
        "top_logprobs": lambda: stub.Step(
            pb.StepRequest(**real, input_token_id=3, top_logprobs=101)
        ),
    }
    assert {k: answered(v) for k, v in too_many.items()} == dict.fromkeys(
        too_many, C.RESOURCE_EXHAUSTED
    )
    long_id = pb.StepRequest(session_id="x" * 20_000, version=1, expected_digest=at.digest)
    with pytest.raises(grpc.RpcError) as e:
        stub.Step(long_id)
    assert e.value.code() == C.INVALID_ARGUMENT and len(e.value.details()) < 300
    assert answered(lambda: stub.Tokenize(pb.TokenizeRequest(text="a" * (1 << 20)))) == C.OK


@pytest.mark.parametrize(
    "method",
    ["Info", "Tokenize", "Detokenize", "Prefill", "Step", "ComputeKV", "Repair", "Tick"],
)
def test_random_bytes_as_a_request(world, method):
    """Bytes that are no protobuf (or a protobuf of anything): a status for the client, never
    a handler's INTERNAL."""
    channel = world[3]
    streaming = method == "Prefill"
    path = f"/positronic.v1.ModelWorker/{method}"
    call = (channel.unary_stream if streaming else channel.unary_unary)(
        path, request_serializer=None, response_deserializer=None
    )
    for payload in (b"\xff\xff\xff", b"\x0a\xff\x01", bytes(range(256)), b"\x12\x03\xff\xfe\xfd"):
        code = answered(lambda payload=payload: call(payload, timeout=30))
        assert code not in BUGS, (method, payload[:8], code)
