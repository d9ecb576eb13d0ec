# loramux server image.
#   CPU (default):  docker build -t loramux .
#   CUDA:           docker build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 -t loramux:cuda .
# (run the CUDA image with `--gpus all`; the NVIDIA driver comes from the host.)

# ---- build: a virtualenv with torch and loramux, copied whole into the runtime
FROM python:3.11-slim-bookworm AS build

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# Torch first, from the index of the chosen variant, in its own layer: it is the
# big, slow-changing part, and `pip install .` below then finds `torch>=...`
# already satisfied instead of pulling the default (CUDA) wheel from PyPI.
RUN pip install --no-cache-dir "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"

WORKDIR /src
COPY . .
# Then the package and the rest of its dependencies, as for a local install.
RUN pip install --no-cache-dir . \
    && python -c "import torch, loramux; print('torch', torch.__version__)"

# ---- runtime: no compilers, no sources, no pip cache; runs as a non-root user
FROM python:3.11-slim-bookworm AS runtime

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HOME=/app/.cache/huggingface

RUN groupadd --system --gid 10001 loramux \
    && useradd --system --no-log-init --uid 10001 --gid loramux --home-dir /app --shell /usr/sbin/nologin loramux \
    && mkdir -p /app/adapters_store /app/.cache/huggingface \
    && chown -R loramux:loramux /app

COPY --from=build /opt/venv /opt/venv

WORKDIR /app
# Numeric, so runtimes that check "runAsNonRoot" can verify it without /etc/passwd.
USER 10001:10001

# Adapters uploaded at run time survive the container; the directory is created
# above, owned by the user, so a fresh named volume inherits that ownership.
VOLUME /app/adapters_store

# 50051: gRPC (Generation, Adapters, health, reflection); 9090: Prometheus /metrics;
# 8000: the OpenAI-compatible HTTP API.
EXPOSE 50051 9090 8000

# Asks the standard grpc.health.v1 service, as an orchestrator would; any error
# (not listening yet, NOT_SERVING while draining on SIGTERM) exits non-zero.
# The start period covers loading the base model.
HEALTHCHECK --interval=30s --timeout=10s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import sys, grpc; from grpc_health.v1 import health_pb2 as pb, health_pb2_grpc as rpc; ch = grpc.insecure_channel('127.0.0.1:50051'); r = rpc.HealthStub(ch).Check(pb.HealthCheckRequest(service=''), timeout=5); sys.exit(0 if r.status == pb.HealthCheckResponse.SERVING else 1)"]

ENTRYPOINT ["loramux"]
CMD ["serve", "--host", "0.0.0.0", "--port", "50051", "--metrics-port", "9090", "--http-port", "8000", "--store", "/app/adapters_store"]
