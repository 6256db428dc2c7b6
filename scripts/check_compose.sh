#!/usr/bin/env bash
# Validates docker-compose.yml, alone and with the TLS overlay, with Debian's docker-compose
# (no engine needed for `config`).
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
