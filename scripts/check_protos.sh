#!/usr/bin/env bash
# Fails when positronic/v1 is not exactly what protos/ generates (stale committed stubs).
set -euo pipefail
cd "$(dirname "$0")/.."
py=$(command -v "${PYTHON:-python}")
py="$(cd "$(dirname "$py")" && pwd)/$(basename "$py")"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$tmp/positronic/v1"
cp -r protos scripts "$tmp/"
(cd "$tmp" && PYTHON="$py" bash scripts/gen_protos.sh)
if ! diff -r -x __pycache__ positronic/v1 "$tmp/positronic/v1"; then
  echo "positronic/v1 is stale: run 'make proto' and commit the result" >&2
  exit 1
fi
echo "generated stubs are fresh"
