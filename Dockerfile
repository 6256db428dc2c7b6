# One image for every service: `positronic authority`, `positronic worker`, `positronic generate`.
FROM python:3.11-slim

ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1
WORKDIR /app

# CPU torch first (a bare `torch` would pull the CUDA build); a GPU image swaps this line.
RUN pip install "torch==2.13.*" --index-url https://download.pytorch.org/whl/cpu

COPY pyproject.toml README.md ./
COPY protos ./protos
COPY positronic ./positronic
COPY cache_authority ./cache_authority
COPY model_worker ./model_worker
RUN pip install .

RUN useradd --create-home --uid 1000 positronic && mkdir -p /data && chown positronic /data
USER positronic

# 50051 authority, 50052 worker, 9101/9102 their Prometheus metrics.
EXPOSE 50051 50052 9101 9102
CMD ["positronic", "--help"]
