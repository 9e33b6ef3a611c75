# syntax=docker/dockerfile:1
# rsa-pl on a CUDA GPU box (BuildKit, the default builder, for the pip cache mount):
#   docker build -t rsa-pl .
#   docker run --gpus all -v "$PWD":/workspace rsa-pl train-safety
#   docker run --gpus all -v "$PWD":/workspace --entrypoint dvc rsa-pl repro
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    HF_HOME=/workspace/.cache/huggingface

# Python 3.12 (Ubuntu 24.04's), git for DVC; no compilers: every wheel is prebuilt.
# hadolint DL3008 (pin apt versions) is ignored in .hadolint.yaml: the base image pins the distribution.
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv git ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && git config --system --add safe.directory /workspace

# The dependencies in their own layer, from pyproject.toml alone, so that a code edit does not
# reinstall torch and the stack: the CUDA build of the pinned torch first (the PyTorch index makes
# the CUDA variant explicit), then the package's pinned stack (lightning, transformers, peft,
# bitsandbytes, dvc, ...) and the OpenAI client of evaluate.judge llm, installed through the
# package built from pyproject.toml before any of its code is copied (it has no modules yet).
# pip's cache is a BuildKit cache mount: kept between builds, never in the image.
COPY pyproject.toml README.md /opt/rsa-pl/
RUN --mount=type=cache,target=/root/.cache/pip \
    python3 -m venv /opt/venv \
    && pip install --index-url https://download.pytorch.org/whl/cu128 torch==2.13.0 \
    && pip install "/opt/rsa-pl[judge]"

# Then the code, without its dependencies (all installed above).
COPY rsa_pl /opt/rsa-pl/rsa_pl
RUN pip install --no-cache-dir --no-deps --force-reinstall /opt/rsa-pl \
    && rsa-pl --version

# Run as an unprivileged user (uid 1000, usually the host user owning the mounted project; the
# base image's own uid-1000 user "ubuntu" makes way); the project is mounted at /workspace.
RUN if id ubuntu >/dev/null 2>&1; then userdel --remove ubuntu; fi \
    && useradd --create-home --uid 1000 --user-group rsa
USER 1000:1000
WORKDIR /workspace

ENTRYPOINT ["rsa-pl"]
CMD ["--help"]
