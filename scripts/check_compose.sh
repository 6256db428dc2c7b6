#!/usr/bin/env bash
# Validates the compose files with Debian's docker-compose (no engine needed for `config`): the
# CPU deployment (docker-compose.yml), with the TLS overlay, and the GPU variant merged over it
# (docker-compose.gpu.yml); then checks the image's build context as the Docker client would
# send it (.dockerignore).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v docker-compose >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker-compose >/dev/null
  else
    echo "docker-compose is not installed (apt-get install docker-compose)" >&2
    exit 1
  fi
fi
docker-compose -f docker-compose.yml config -q
echo "docker-compose.yml is valid"
docker-compose -f docker-compose.yml -f docker-compose.tls.yml config -q
echo "docker-compose.yml + docker-compose.tls.yml (TLS, token) is valid"
if [ -f docker-compose.gpu.yml ]; then
  docker-compose -f docker-compose.yml -f docker-compose.gpu.yml config -q
  echo "docker-compose.yml + docker-compose.gpu.yml is valid"
fi

# The build context, computed by docker-py (Debian's docker-compose depends on it) with the
# client's own .dockerignore rules: what the Dockerfile copies must be in it, the rest must not.
/usr/bin/python3 - <<'PY'
import os
import sys

from docker.utils.build import exclude_paths

patterns = [line.strip() for line in open(".dockerignore") if line.strip()[:1] not in ("", "#")]
files = [f for f in exclude_paths(".", patterns) if os.path.isfile(f)]
size = sum(os.path.getsize(f) for f in files)
needed = ["pyproject.toml", "README.md", "positronic/models/stories260K/model.safetensors"]
missing = [f for f in needed if f not in files]
leaked = sorted({f.split("/")[0] for f in files} & {".git", ".venv", "out", "tests"})
if missing or leaked or size > 8 * 2**20:
    sys.exit(f"build context: {size} bytes, missing {missing}, should be ignored: {leaked}")
print(f"build context: {len(files)} files, {size / 2**20:.1f} MiB")
PY
