# GPU image: the vLLM generator and the learner (one GPU, or torchrun + FSDP2 across GPUs/nodes).
#
#   docker build -f deploy/docker/gpu.Dockerfile -t conspo-gpu:0.1.0 .
#
# Built on vLLM's own release image for the version that pyproject.toml's `vllm` extra pins, so
# CUDA, NCCL, torch and vLLM come as the vLLM project tested them. conspo is installed on top
# with every package the base ships frozen as a constraint (deploy/docker/freeze_constraints.py):
# if conspo's requirements disagree with the base (another torch, another vLLM) the build fails
# here, not at run time on a GPU.
#
# Two stages: a slim stage builds conspo's wheel, so the runtime image gets one wheel file
# instead of the source tree.

ARG VLLM_VERSION=0.33.0
ARG VLLM_IMAGE=vllm/vllm-openai:v${VLLM_VERSION}
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

# ------------------------------------------------------------------------------------ wheel
FROM ${PYTHON_IMAGE} AS wheel
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
COPY . /src
RUN pip wheel --no-deps --wheel-dir /wheels /src

# ---------------------------------------------------------------------------------- runtime
FROM ${VLLM_IMAGE} AS runtime
ARG VLLM_VERSION

USER root
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_BREAK_SYSTEM_PACKAGES=1

# tini as PID 1: forwards SIGTERM so the learner can finish its step and checkpoint, and reaps
# vLLM's worker processes.
RUN apt-get update \
 && apt-get install -y --no-install-recommends tini \
 && rm -rf /var/lib/apt/lists/*

# The base must be the vLLM that the extra pins; then freeze everything it ships.
COPY deploy/docker/freeze_constraints.py /tmp/freeze_constraints.py
RUN python3 -c "import importlib.metadata as m, sys; v = m.version('vllm'); \
sys.exit(0 if v.split('+')[0] == '${VLLM_VERSION}' else f'base has vllm {v}, expected ${VLLM_VERSION}')" \
 && python3 /tmp/freeze_constraints.py > /tmp/image-constraints.txt

COPY --from=wheel /wheels /tmp/wheels
RUN set -eu; whl="$(ls /tmp/wheels/conspo-*.whl)"; \
    python3 -m pip install --constraint /tmp/image-constraints.txt "${whl}[vllm]" \
 && conspo --help > /dev/null \
 && rm -rf /tmp/wheels /tmp/freeze_constraints.py /tmp/image-constraints.txt

RUN groupadd --system --gid 10001 conspo \
 && useradd --system --uid 10001 --gid conspo --home-dir /home/conspo --create-home \
        --shell /usr/sbin/nologin conspo \
 && mkdir -p /data /models \
 && chown conspo:conspo /data /models

COPY --chmod=0755 deploy/docker/healthcheck.py /usr/local/bin/conspo-healthcheck

# HF_HOME on the model store, so a download made once serves every container and restart.
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HOME=/models/hf \
    MPLCONFIGDIR=/tmp/matplotlib \
    VLLM_USAGE_SOURCE=conspo \
    VLLM_NO_USAGE_STATS=1 \
    DO_NOT_TRACK=1 \
    CONSPO_DATA_DIR=/data

WORKDIR /home/conspo
USER 10001:10001

# Prometheus metrics, learner weight-sync rendezvous, torchrun rendezvous (multi-node learner).
EXPOSE 9100 29600 29500

# Model loading and CUDA-graph capture take minutes: a long start period.
HEALTHCHECK --interval=30s --timeout=5s --start-period=900s --retries=3 \
    CMD ["conspo-healthcheck"]

# vLLM's image starts `vllm serve`; conspo runs its own sub-commands.
ENTRYPOINT ["tini", "--"]
CMD ["conspo", "--help"]
