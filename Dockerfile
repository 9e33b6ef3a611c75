# rsa-pl on a CUDA GPU box:
#   docker build -t rsa-pl .
#   docker run --gpus all -v "$PWD":/workspace rsa-pl train-safety
#   docker run --gpus all -v "$PWD":/workspace --entrypoint dvc rsa-pl repro
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
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

# The CUDA build of the pinned torch first (the default index would give the same version's
# CUDA wheel too, but the PyTorch index makes the CUDA variant explicit), then the package with
# its pinned stack (lightning, transformers, peft, bitsandbytes, dvc, ...) and the OpenAI client of
# evaluate.judge llm.
COPY pyproject.toml README.md /opt/rsa-pl/
COPY rsa_pl /opt/rsa-pl/rsa_pl
COPY pipeline /opt/rsa-pl/pipeline
RUN python3 -m venv /opt/venv \
    && pip install --index-url https://download.pytorch.org/whl/cu128 torch==2.13.0 \
    && pip install "/opt/rsa-pl[judge]" \
    && rsa-pl --version

# Run as an unprivileged user (uid 1000, usually the host user owning the mounted project; the
# base image's own uid-1000 user "ubuntu" makes way); the project is mounted at /workspace.
RUN if id ubuntu >/dev/null 2>&1; then userdel --remove ubuntu; fi \
    && useradd --create-home --uid 1000 --user-group rsa
USER 1000:1000
WORKDIR /workspace

ENTRYPOINT ["rsa-pl"]
CMD ["--help"]
