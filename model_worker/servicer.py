"""The ModelWorker servicer: proto in -> plain function -> proto out (STYLE.md rule 2).

Domain errors (WorkerError) become their status here and only here; anything else is a bug,
logged with its traceback and answered INTERNAL.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager

import grpc

from model_worker import calls, convert, tokens
from model_worker.errors import WorkerError
from model_worker.limits import check_compute
from model_worker.metrics import WorkerMetrics
from model_worker.model import LoadedModel
from model_worker.repair import check_request, repair_pairs
from model_worker.replica import ReplicaStore
from model_worker.similarity import tick_similarity
from model_worker.tick import Repairers, check_tick, tick
from positronic import codec
from positronic.repair_params import list_policies_pb
from positronic.rpc import abort
from positronic.v1 import model_worker_pb2 as pb
from positronic.v1 import model_worker_pb2_grpc

logger = logging.getLogger(__name__)


class ModelWorkerServicer(model_worker_pb2_grpc.ModelWorkerServicer):
    def __init__(
        self,
        lm: LoadedModel | None,
        replicas: ReplicaStore | None,
        repairers: Repairers | None,
        metrics: WorkerMetrics,
        load_error: str = "",
    ):
        self.lm = lm
        self.replicas = replicas
        self.repairers = repairers
        self.metrics = metrics
        self.load_error = load_error

    @contextmanager
    def _boundary(self, context: grpc.ServicerContext, rpc: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        except WorkerError as e:
            self.metrics.errors.labels(rpc, e.code).inc()
            abort(context, e.code, e.message, e.details)
        except Exception:
            self.metrics.errors.labels(rpc, "INTERNAL").inc()
            logger.exception("%s failed", rpc)
            context.abort(grpc.StatusCode.INTERNAL, f"{rpc}: internal error (see worker log)")
        finally:
            self.metrics.rpc_seconds.labels(rpc).observe(time.perf_counter() - t0)

    def _ready(self) -> tuple[LoadedModel, ReplicaStore]:
        if self.lm is None or self.replicas is None:
            raise WorkerError("UNAVAILABLE", f"the model failed to load: {self.load_error}")
        return self.lm, self.replicas

    def Info(self, request, context):
        with self._boundary(context, "Info"):
            lm, _ = self._ready()
            return convert.info_to_pb(lm, self.repairers)

    def Tokenize(self, request, context):
        with self._boundary(context, "Tokenize"):
            lm, _ = self._ready()
            enc = tokens.tokenize(lm, request.text, request.add_bos)
            return pb.TokenizeResponse(ids=enc.ids, pieces=enc.pieces, structural=enc.structural)

    def Detokenize(self, request, context):
        with self._boundary(context, "Detokenize"):
            lm, _ = self._ready()
            out = tokens.detokenize(lm, list(request.ids), request.skip_special_tokens)
            return pb.DetokenizeResponse(
                text=out.text,
                pieces=out.pieces,
                piece_bytes=out.piece_bytes,
                piece_texts=out.piece_texts,
            )

    def Prefill(self, request, context):
        with self._boundary(context, "Prefill"):
            lm, replicas = self._ready()
            sid, version = request.session_id, request.version
            check_compute(sid, version, request.expected_digest)
            ids = list(request.token_ids)
            start = request.start_position
            calls.check_tokens(lm, ids, "token")  # malformed before stale
            with replicas.reading(sid, version, request.expected_digest) as rows:
                chunk = calls.check_prefill(lm, rows.count, ids, start, request.chunk_tokens)
                context_rows = rows.prefix(start).detached()  # streaming outlives the lock

            def progress(done: int, total: int) -> None:
                if total > chunk:
                    logger.info("session %s v%d: prefill %d/%d tokens", sid, version, done, total)

            t0 = time.perf_counter()
            for first, kv in calls.prefill(lm, context_rows, ids, chunk, progress):
                for index, part in calls.split_kv(first, kv, codec.MAX_CHUNK_BYTES):
                    yield pb.PrefillResponse(
                        first_token_index=index,
                        kv=convert.kv_to_pb(part),
                        tokens_done=index + part.keys.shape[2],
                        tokens_total=len(ids),
                    )
            self.metrics.forwarded("Prefill", len(ids), time.perf_counter() - t0)

    def Step(self, request, context):
        with self._boundary(context, "Step"):
            lm, replicas = self._ready()
            check_compute(request.session_id, request.version, request.expected_digest)
            params = convert.step_params_from_pb(request)
            calls.check_step(lm, params)  # malformed before stale
            with replicas.reading(
                request.session_id, request.version, request.expected_digest
            ) as rows:
                result = calls.step(lm, rows, params)
            seconds = result.output.forward_ns / 1e9
            self.metrics.step_seconds.observe(seconds)
            self.metrics.forwarded("Step", 1, seconds)
            return convert.step_result_to_pb(result)

    def ComputeKV(self, request, context):
        with self._boundary(context, "ComputeKV"):
            lm, replicas = self._ready()
            check_compute(request.session_id, request.version, request.expected_digest)
            insertions = [(i.position, i.token_id) for i in request.insertions]
            calls.check_insertions(lm, insertions)
            t0 = time.perf_counter()
            with replicas.reading(
                request.session_id, request.version, request.expected_digest
            ) as rows:
                kvs = calls.compute_kv(lm, rows, insertions)
            self.metrics.forwarded("ComputeKV", len(kvs), time.perf_counter() - t0)
            return pb.ComputeKVResponse(kv=[convert.kv_to_pb(kv) for kv in kvs])

    def Repair(self, request, context):
        with self._boundary(context, "Repair"):
            _, replicas = self._ready()
            if self.repairers is None:
                raise WorkerError("UNAVAILABLE", "no repairer is loaded")
            check_compute(request.session_id, request.version, request.expected_digest)
            pairs = convert.pairs_from_pb(request.pairs)
            check_request(pairs, request.max_candidates)
            with replicas.reading(
                request.session_id, request.version, request.expected_digest
            ) as rows:
                repairer = self.repairers.for_repair_rpc
                results = repair_pairs(repairer, rows, pairs, request.max_candidates)
            return convert.repairs_to_pb(pairs, results)

    def Tick(self, request, context):
        with self._boundary(context, "Tick"):
            lm, replicas = self._ready()
            if self.repairers is None:
                raise WorkerError("UNAVAILABLE", "no repairer is loaded")
            check_compute(request.session_id, request.version, request.expected_digest)
            params = convert.tick_params_from_pb(request)
            check_tick(lm, params, self.repairers)  # malformed before stale
            with replicas.reading(
                request.session_id, request.version, request.expected_digest
            ) as rows:
                result = tick(lm, rows, params, self.repairers)
                similarity = None
                if request.adjacent_similarity:  # asked for by a redundancy policy only
                    similarity = tick_similarity(rows, result.step.output.kv, lm.geometry.rope)
            seconds = result.forward_ns / 1e9
            self.metrics.step_seconds.observe(seconds)
            self.metrics.forwarded("Tick", result.forwards, seconds)
            return convert.tick_result_to_pb(result, similarity)

    def ListPolicies(self, request, context):
        with self._boundary(context, "ListPolicies"):
            return list_policies_pb()
