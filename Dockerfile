# GPU image for `make build` / `make bash`. Not exercised by CI: no Docker engine runs on the
# project's machines. The base image brings CUDA and a CUDA build of torch (pyproject only
# asks for torch>=2.1, so pip keeps it); any pytorch/pytorch *-runtime tag works.
ARG BASE_IMAGE=pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime
FROM ${BASE_IMAGE}

ENV IN_CONTAINER=1 \
    PIP_NO_CACHE_DIR=1 \
    HF_HOME=/root/.cache/huggingface
RUN apt-get update && apt-get install -y --no-install-recommends make && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY pyproject.toml README.md Makefile ./
COPY src ./src
RUN pip install ".[eval]"

# `make bash` mounts the data sets at /app/datasets and outputs/ at /app/outputs, so
# `make run` inside the container is the same command as outside.
CMD ["bash"]
