# One image for every service: `positronic authority`, `positronic worker`, `positronic generate`.
# CPU by default; docker-compose.gpu.yml builds the worker's image with a CUDA torch instead.
FROM python:3.11-slim

ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1
WORKDIR /app

# torch first, from the index that has the wanted build: the CPU build by default (PyPI's torch
# for Linux x86_64 is the CUDA build, gigabytes of CUDA libraries a CPU image does not need).
# The GPU variant passes PyPI's index (CUDA 13) or a CUDA 12 index of download.pytorch.org.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN pip install "torch==2.13.*" --index-url "$TORCH_INDEX_URL"

# The package, with the demo model inside it (positronic/models); torch above already satisfies
# its torch requirement, so pip keeps that build.
COPY pyproject.toml README.md ./
COPY protos ./protos
COPY positronic ./positronic
COPY cache_authority ./cache_authority
COPY model_worker ./model_worker
RUN pip install . && rm -rf build

# An unprivileged user. /data (authority state) and /hf-cache (hub downloads) are mount points of
# named volumes; Docker seeds an empty named volume with the image's folder and its owner, so
# they must exist here and belong to that user, or the services cannot write to them.
RUN useradd --create-home --uid 1000 positronic \
    && mkdir -p /data /hf-cache && chown positronic /data /hf-cache
USER positronic

# 50051 authority, 50052 worker, 9101/9102 their Prometheus metrics.
EXPOSE 50051 50052 9101 9102
CMD ["positronic", "--help"]
