# Developer entry points. Everything runs inside .venv (created by `make install`).
PY ?= .venv/bin/python

.PHONY: install proto proto-check lint typecheck test bench compose-check

install:
	python3 -m venv .venv
	.venv/bin/pip install "torch==2.13.*" -e ".[dev]"

proto:  ## regenerate positronic/v1 from protos/
	PYTHON=$(PY) scripts/gen_protos.sh

proto-check:  ## fail when the committed stubs differ from what protos/ generates
	PYTHON=$(PY) scripts/check_protos.sh

lint:
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy

test:
	$(PY) -m pytest

bench:
	$(PY) -m positronic.cli bench quality --model ../shared/models/stories260K \
		--text-file ../shared/data/tinystories_dev.txt --budget 96 --json out/quality.json \
		--plot out/quality.png
	$(PY) -m positronic.cli bench speed --model ../shared/models/stories260K --json out/speed.json
