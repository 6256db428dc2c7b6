"""Starting a model worker: config, model loading, replicas, gRPC server, metrics.

In-process use (tests, an embedded loop):

    running = start_worker(WorkerConfig(model="../shared/models/stories260K",
                                        authority="127.0.0.1:50051", listen="127.0.0.1:0"))
    ... channel to f"127.0.0.1:{running.port}" ...
    running.stop()

A model that fails to load leaves the server up with gRPC health NOT_SERVING and every RPC
answering UNAVAILABLE, so orchestrators see why instead of a crash loop.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

from model_worker.authority_client import AuthoritySync
from model_worker.lm_repair import LMRepairer
from model_worker.metrics import WorkerMetrics
from model_worker.model import DTYPES, FORWARDS, LoadedModel, check_session_geometry, load_model
from model_worker.repair import Repairer
from model_worker.replica import ReplicaStore, SyncSource
from model_worker.servicer import ModelWorkerServicer
from model_worker.tick import Repairers
from positronic.request_parsing import register_servicer
from positronic.rpc import RunningServer, start_server
from positronic.tls import ClientTls, ServerTls
from positronic.v1 import model_worker_pb2

logger = logging.getLogger(__name__)

SERVICE = model_worker_pb2.DESCRIPTOR.services_by_name["ModelWorker"]
SERVICE_NAME = SERVICE.full_name
REPAIRERS = ("lm", "mlm")
DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class WorkerConfig:
    model: str  # directory or hub id of the causal LM
    authority: str = ""  # HOST:PORT of the cache authority; empty: compute RPCs are UNAVAILABLE
    listen: str = "127.0.0.1:50052"  # HOST:PORT to bind; port 0 picks one
    repair: str = "lm"  # repairer: the causal model itself, or a masked LM
    repair_model: str | None = None  # masked LM for --repair mlm (e.g. distilbert-base-uncased)
    device: str = "auto"  # auto: cuda when available
    dtype: str = "auto"  # auto: float32 on CPU, the checkpoint's dtype on an accelerator
    forward: str = "lean"  # lean: lean_llama.py where it reproduces the model; hf: the library's
    tokenizer: str | None = None  # default: the model's own directory or id
    auth_token: str | None = None  # bearer token for our server and for calls to the authority
    metrics_port: int | None = None  # serve Prometheus /metrics here
    max_replicas: int = 32  # sessions whose replicas are kept; least recently used dropped
    sync_timeout_s: float = 120.0  # deadline of one Sync call
    max_workers: int = 8  # gRPC handler threads
    tls: ServerTls | None = None  # serve TLS (mutual when it names a client CA)
    authority_tls: ClientTls | None = None  # call the authority over TLS

    def __post_init__(self) -> None:
        if not self.model:
            raise ValueError("a model (directory or hub id) is required")
        for name in ("listen", "authority"):
            value = getattr(self, name)
            if value and (":" not in value or not value.rsplit(":", 1)[1].isdigit()):
                raise ValueError(f"{name} must be HOST:PORT, got {value!r}")
        if self.repair not in REPAIRERS:
            raise ValueError(f"repair must be one of {REPAIRERS}, got {self.repair!r}")
        if self.repair == "mlm" and not self.repair_model:
            raise ValueError("repair mlm needs a repair model (e.g. distilbert-base-uncased)")
        if not (self.device in DEVICES or self.device.startswith("cuda:")):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ValueError(f"dtype must be auto or one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.forward not in FORWARDS:
            raise ValueError(f"forward must be one of {', '.join(FORWARDS)}, got {self.forward!r}")
        if self.metrics_port is not None and not 0 <= self.metrics_port < 65536:
            raise ValueError(f"metrics port {self.metrics_port} out of range")
        if self.max_replicas < 1 or self.sync_timeout_s <= 0 or self.max_workers < 1:
            raise ValueError("max_replicas, sync_timeout_s and max_workers must be positive")


@dataclass
class RunningWorker(RunningServer):
    """A started worker: the gRPC server plus its servicer (model, replicas, metrics)."""

    servicer: ModelWorkerServicer | None = None
    metrics_port: int | None = None  # bound /metrics port, when served


class _NoAuthority:
    def sync(self, session_id: str, from_version: int):
        from model_worker.errors import WorkerError

        raise WorkerError("UNAVAILABLE", "this worker was started without an authority address")


def _repairers(config: WorkerConfig, lm: LoadedModel, configured: Repairer | None) -> Repairers:
    """The causal model's repairer always; the masked LM when --repair mlm loads one."""
    mlm: Repairer | None = None
    if config.repair == "mlm":
        from model_worker.mlm_repair import MLMRepairer, load_masked_lm

        masked = load_masked_lm(config.repair_model or "", device=str(lm.device))
        mlm = MLMRepairer(lm, masked)
    return Repairers(LMRepairer(lm), mlm, config.repair, configured)


def start_worker(
    config: WorkerConfig,
    *,
    model: LoadedModel | None = None,
    repairer: Repairer | None = None,
    sync_source: SyncSource | None = None,
) -> RunningWorker:
    """Load (unless `model` is given), then serve. Never raises for a model that fails to load."""
    metrics = WorkerMetrics()
    lm, load_error = model, ""
    repairers = None
    try:
        if lm is None:
            lm = load_model(
                config.model,
                device=config.device,
                dtype=config.dtype,
                tokenizer=config.tokenizer,
                forward=config.forward,
            )
        repairers = _repairers(config, lm, repairer)
    except Exception as e:
        logger.exception("model %s failed to load", config.model)
        lm, repairers, load_error = None, None, f"{type(e).__name__}: {e}"
    on_stop = []
    replicas = None
    if lm is not None:
        if sync_source is None and config.authority:
            client = AuthoritySync(
                config.authority, config.auth_token, config.sync_timeout_s, config.authority_tls
            )
            on_stop.append(client.close)
            sync_source = client
        geometry = lm.geometry
        replicas = ReplicaStore(
            sync_source or _NoAuthority(),
            device=lm.device,
            accept=lambda g: check_session_geometry(g, geometry),
            max_replicas=config.max_replicas,
            on_sync_bytes=metrics.add_sync_bytes,
            on_followed=metrics.followed,
        )
        on_stop.insert(0, replicas.close)  # followers end before the authority channel closes
    servicer = ModelWorkerServicer(lm, replicas, repairers, metrics, load_error)
    running = start_server(
        config.listen,
        lambda server: register_servicer(server, servicer, SERVICE),
        [SERVICE_NAME],
        auth_token=config.auth_token,
        max_workers=config.max_workers,
        serving=lm is not None,
        tls=config.tls,
    )
    metrics_port = None
    if config.metrics_port is not None:
        host = config.listen.rsplit(":", 1)[0].strip("[]") or "0.0.0.0"
        metrics_port, stop_metrics = metrics.serve(config.metrics_port, host)
        on_stop.append(stop_metrics)
    fields = {f.name: getattr(running, f.name) for f in dataclasses.fields(running)}
    worker = RunningWorker(**fields, servicer=servicer, metrics_port=metrics_port)
    worker.on_stop.extend(on_stop)
    logger.info(
        "worker serving %s on port %d (%s)",
        config.model,
        running.port,
        "SERVING" if lm is not None else f"NOT_SERVING: {load_error}",
    )
    return worker
