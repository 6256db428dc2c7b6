"""docker-compose.yml end to end without a Docker engine: each service's command, environment,
ports and health check from the file, run as local processes with service names resolving to
loopback and volumes mapped to local folders; alone, and with the TLS overlay
(docker-compose.tls.yml: mutual TLS and the bearer token, certificates made by the test)."""

from __future__ import annotations

import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from positronic.models import demo_model_dir
from tests.conftest import REPO
from tests.loop_fixtures import env as clean_env
from tests.tls_fixtures import make_certs

COMPOSE = REPO / "docker-compose.yml"
TLS_OVERLAY = REPO / "docker-compose.tls.yml"


def merge(spec: dict, overlay: dict) -> dict:
    """What `docker compose -f base -f overlay` does to the keys our files use: environment
    maps merge, volume lists extend."""
    for name, svc in overlay["services"].items():
        base = spec["services"][name]
        base.setdefault("environment", {}).update(svc.get("environment", {}))
        base["volumes"] = [*base.get("volumes", []), *svc.get("volumes", [])]
    return spec


def substitute(value: str, variables: dict[str, str]) -> str:
    """Compose's ${VAR:-default} and ${VAR} interpolation."""

    def one(m: re.Match) -> str:
        name, default = m.group(1), m.group(3)
        return variables.get(name) or (default if default is not None else "")

    return re.sub(r"\$\{(\w+)(:-([^}]*))?\}", one, value)


class Topology:
    def __init__(self, spec: dict, variables: dict[str, str], volume_root: Path):
        self.spec = spec
        self.names = list(spec["services"])
        self.mounts: dict[str, dict[str, str]] = {}
        for name, svc in spec["services"].items():
            mounts = {}
            for v in svc.get("volumes", []):
                source, target = substitute(v, variables).split(":")[:2]
                if source in spec.get("volumes", {}):  # a named volume: a fresh local folder
                    host = volume_root / source
                    host.mkdir(parents=True, exist_ok=True)
                else:
                    host = (COMPOSE.parent / source).resolve()
                mounts[target] = str(host)
            self.mounts[name] = mounts

    def translate(self, service: str, value: str) -> str:
        """Container view -> this machine: mounts to folders, service hosts to loopback."""
        for target, host in self.mounts[service].items():
            if value == target or value.startswith(target + "/"):
                value = host + value[len(target) :]
        value = re.sub(r"^0\.0\.0\.0:", "127.0.0.1:", value)
        for other in self.names:
            value = re.sub(rf"^(dns:///)?{re.escape(other)}:(\d+)$", r"127.0.0.1:\2", value)
        return value

    def argv(self, service: str, command: list[str]) -> list[str]:
        assert command[0] == "positronic"
        return [sys.executable, "-m", "positronic.cli"] + [
            self.translate(service, c) for c in command[1:]
        ]

    def environment(self, service: str) -> dict[str, str]:
        e = clean_env()
        for k, v in (self.spec["services"][service].get("environment") or {}).items():
            e[k] = self.translate(service, str(v))
        return e

    def healthy(self, service: str, timeout_s: float) -> bool:
        check = self.spec["services"][service]["healthcheck"]["test"]
        assert check[0] == "CMD"
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            r = subprocess.run(
                self.argv(service, check[1:]),
                cwd=REPO,
                env=self.environment(service),  # a health check runs in its container's env
                capture_output=True,
                text=True,
            )
            if r.returncode == 0:
                return True
            time.sleep(0.5)
        return False


def order(spec: dict) -> list[str]:
    done: list[str] = []
    while len(done) < len(spec["services"]):
        for name, svc in spec["services"].items():
            if name not in done and all(d in done for d in svc.get("depends_on", {})):
                done.append(name)
    return done


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls overlay"])
def test_compose_file_runs_as_local_processes(tmp_path, tls):
    models = demo_model_dir().parent  # the packaged folder that holds stories260K
    spec = yaml.safe_load(COMPOSE.read_text())
    assert order(spec) == ["authority", "worker", "demo"]
    variables = {"POSITRONIC_MODELS_DIR": str(models)}
    if tls:
        secrets = tmp_path / "secrets"
        make_certs(secrets)
        (secrets / "token").write_text("compose-token\n")
        variables["POSITRONIC_CERTS_DIR"] = str(secrets)
        spec = merge(spec, yaml.safe_load(TLS_OVERLAY.read_text()))
    topo = Topology(spec, variables, tmp_path)
    procs: list[subprocess.Popen] = []
    try:
        for name in ("authority", "worker"):
            svc = spec["services"][name]
            procs.append(
                subprocess.Popen(
                    topo.argv(name, svc["command"]),
                    cwd=REPO,
                    env=topo.environment(name),
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                )
            )
            assert topo.healthy(name, timeout_s=120), f"{name} never became healthy"
        # Every published port answers: gRPC (health above) and Prometheus metrics.
        for name, port in (("authority", 9101), ("worker", 9102)):
            published = [str(p).split(":")[-1] for p in spec["services"][name]["ports"]]
            assert str(port) in published
            body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
            assert b"positronic_" in body
        demo = spec["services"]["demo"]
        r = subprocess.run(
            topo.argv("demo", demo["command"]),
            cwd=REPO,
            env=topo.environment("demo"),
            capture_output=True,
            text=True,
            timeout=300,
        )
        if r.returncode != 0:
            for p in procs:
                p.terminate()
            logs = [p.communicate(timeout=15)[1][-2000:] for p in procs]
            raise AssertionError(f"demo failed: {r.stderr[-2000:]}\nservices: {logs}")
        assert len(r.stdout.split()) > 30  # readable text streamed to stdout
        # The authority kept its state in the mapped data volume.
        assert any((tmp_path / "authority-data").iterdir())
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
