#!/usr/bin/env bash
# Regenerates positronic/v1 from protos/ (run from the repository root, in the project's venv).
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python}
bin=$(dirname "$(command -v "$py")")
rm -f positronic/v1/*_pb2*.py positronic/v1/*_pb2*.pyi
PATH="$bin:$PATH" "$py" -m grpc_tools.protoc -Iprotos \
  --python_out=. --grpc_python_out=. --mypy_out=quiet:. --mypy_grpc_out=quiet:. \
  protos/positronic/v1/*.proto
touch positronic/v1/__init__.py
