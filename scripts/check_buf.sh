#!/usr/bin/env bash
# Proto hygiene: `buf lint` (protos/buf.yaml says which rules and why) and `buf breaking` at the
# wire/JSON level against the previous commit's protos (AGAINST=<git ref> to pick another).
# Needs the buf binary from npm: (cd tools && npm ci --ignore-scripts).
set -euo pipefail
cd "$(dirname "$0")/.."
buf=tools/node_modules/.bin/buf
if [ ! -x "$buf" ]; then
  echo "buf is not installed: (cd tools && npm ci --ignore-scripts)" >&2
  exit 1
fi
against=${AGAINST:-HEAD~1}

"$buf" lint protos
echo "buf lint: clean"

# A shallow clone (CI systems often fetch one commit) has no previous commit: deepen it once.
if ! git rev-parse -q --verify "$against^{commit}" >/dev/null &&
  [ "$(git rev-parse --is-shallow-repository)" = true ]; then
  git fetch -q --deepen=1 || true
fi
if ! git rev-parse -q --verify "$against^{commit}" >/dev/null; then
  echo "buf breaking: $against does not exist (the first commit?): nothing to compare with"
  exit 0
fi
if ! git cat-file -e "$against:protos" 2>/dev/null; then
  echo "buf breaking: $against has no protos/: nothing to compare with"
  exit 0
fi
"$buf" breaking protos --against ".git#ref=$(git rev-parse "$against"),subdir=protos"
echo "buf breaking: wire- and JSON-compatible with $against"
