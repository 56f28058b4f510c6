# The single TLT image: `tlt run`, `tlt serve rollout|drafter|trainer` and the kopf operator
# (`kopf run -m tlt_operator.handlers`, see deploy/helm/tlt) all run from it.
#
#   docker build -t ghcr.io/tlt-dev/tlt:0.1.0 .
#   docker run --rm ghcr.io/tlt-dev/tlt:0.1.0 run --help
#
# torch is pinned as in pyproject.toml. From PyPI it is the CUDA-enabled wheel (runs on CPU and GPU
# nodes); for a smaller CPU-only image pass the PyTorch CPU wheel index:
#   docker build --build-arg TORCH_INDEX_URL=<CPU wheel index URL> -t tlt:cpu .
FROM python:3.11-slim

ARG TORCH_INDEX_URL=""

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# torch first, in its own layer: it is by far the largest dependency and changes least often.
RUN pip install ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "torch==2.13.0"

WORKDIR /src
COPY pyproject.toml README.md ./
COPY proto ./proto
COPY services ./services
COPY operators ./operators
RUN pip install . && cd / && rm -rf /src

# Non-root user (the chart's and the operator's pods run as 10001); /var/lib/tlt is the default mount
# point of an RLJob's shared volume and must be writable without one.
RUN groupadd --system --gid 10001 tlt \
    && useradd --system --uid 10001 --gid 10001 --create-home --home-dir /home/tlt --shell /usr/sbin/nologin tlt \
    && mkdir -p /var/lib/tlt /workspace \
    && chown 10001:10001 /var/lib/tlt /workspace

USER 10001:10001
ENV HOME=/home/tlt
WORKDIR /workspace

# gRPC (rollout/drafter/trainer services) and Prometheus metrics + health probes.
EXPOSE 50051 8080

ENTRYPOINT ["tlt"]
CMD ["--help"]
