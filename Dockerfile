# syntax=docker/dockerfile:1
# rsa-pl on a CUDA GPU box (BuildKit, the default builder, for the pip cache mount); docs/docker.md
# has the whole story (the HF cache, another uid, DDP on two GPUs, compose.yaml):
#   docker build -t rsa-pl .
#   docker run --gpus all -v "$PWD":/workspace rsa-pl train-safety
#   docker run --gpus all -v "$PWD":/workspace --entrypoint dvc rsa-pl repro
#
# A plain Ubuntu base, not nvidia/cuda:*-cudnn-runtime: the CUDA build of torch brings its CUDA
# libraries as wheels (nvidia-cublas-cu12, nvidia-cudnn-cu12, nccl, ... in site-packages/nvidia)
# and loads those, so a CUDA base's own copy in /usr/local/cuda is never used. Measured for
# docs/docker.md: the CUDA 12.8 wheels (torch's nvidia-*-cu12 set, triton, cuda-bindings) unpack
# to 5.4 GB besides torch's own 1.8 GB; the CUDA runtime libraries a cudnn-runtime base adds are
# about 2.0 GB (Debian's packaging of CUDA 12.4, a lower bound for 12.8) plus cuDNN 9 (1.1 GB as
# the wheel): about 3 GB that only duplicate the wheels'. The GPU driver comes from the host: the
# NVIDIA container toolkit mounts it at `docker run --gpus all`.
FROM ubuntu:24.04

# The NVIDIA container toolkit reads these (the nvidia/cuda images set them too): every GPU the
# run is given, with the compute (CUDA) and utility (nvidia-smi) driver libraries.
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    HF_HOME=/workspace/.cache/huggingface

# Python 3.12 (Ubuntu 24.04's), git for DVC; no compilers: every wheel is prebuilt.
# hadolint DL3008 (pin apt versions) is ignored in .hadolint.yaml: the base image pins the distribution.
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv git ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && git config --system --add safe.directory /workspace

# The dependencies in their own layer, from the lock alone, so that a code edit does not reinstall
# torch and the stack: first the CUDA 12.8 build of torch 2.13.0 from the PyTorch index (which makes
# the CUDA variant explicit) with the CUDA wheels it pins, then requirements/lock.txt (the runtime
# and the judge extra's OpenAI client at exact versions; its torch==2.13.0 is the one just
# installed, and it leaves the CUDA wheels to torch: requirements/cuda-excludes.txt says why).
# pip's cache is a BuildKit cache mount: kept between builds, never in the image.
COPY requirements/lock.txt /opt/rsa-pl/requirements/lock.txt
RUN --mount=type=cache,target=/root/.cache/pip \
    python3 -m venv /opt/venv \
    && pip install --index-url https://download.pytorch.org/whl/cu128 torch==2.13.0 \
    && pip install -r /opt/rsa-pl/requirements/lock.txt

# Then the code, without its dependencies (all installed above, at the lock's versions: pip check
# fails the build if the lock misses one).
COPY pyproject.toml README.md /opt/rsa-pl/
COPY rsa_pl /opt/rsa-pl/rsa_pl
RUN pip install --no-cache-dir --no-deps /opt/rsa-pl \
    && pip check \
    && rsa-pl --version

# Run as an unprivileged user (uid 1000, usually the host user owning the mounted project; the
# base image's own uid-1000 user "ubuntu" makes way); the project is mounted at /workspace.
# Another uid (`docker run --user "$(id -u):$(id -g)"`) has no passwd entry, so HOME is set here
# and the home is writable by all (sticky, like /tmp): caches and config under HOME still work.
RUN if id ubuntu >/dev/null 2>&1; then userdel --remove ubuntu; fi \
    && useradd --create-home --uid 1000 --user-group rsa \
    && chmod 1777 /home/rsa
ENV HOME=/home/rsa
USER 1000:1000
WORKDIR /workspace

ENTRYPOINT ["rsa-pl"]
CMD ["--help"]
