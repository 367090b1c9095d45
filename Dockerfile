# syntax=docker/dockerfile:1
# imgsim images. Targets:
#   serve     (the default, last stage) seldon-core-microservice ModelServer on ONNX Runtime, no torch; uid 8888;
#             Python 3.12 (seldon-core 1.19, its maintained release, needs it)
#   serve-v2  the Open Inference Protocol server: MLServer running model_server/v2, no torch; uid 8888
#   pipeline  split/train/extract (and `mlflow server` on the cluster) with the CUDA build of torch
# Build:  docker build -t imgsim:0.1.0 .      docker build --target pipeline -t imgsim-pipeline:0.1.0 .
#         docker build --target serve-v2 -t imgsim-serve-v2:0.1.0 .
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG SERVE_PYTHON_IMAGE=python:3.12-slim-bookworm

FROM ${PYTHON_IMAGE} AS build-base
# annoy's setup.py compiles with -march=native, which would tie the image to the build machine's CPU (SIGILL
# on older nodes); the same flags with a fixed target instead (x86-64-v3 = AVX2/FMA, every current EC2 type).
ARG ANNOY_MARCH=x86-64-v3
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PATH=/opt/venv/bin:$PATH \
    ANNOY_COMPILER_ARGS="-D_CRT_SECURE_NO_WARNINGS,-fpermissive,-march=${ANNOY_MARCH},-O3,-ffast-math,-fno-associative-math,-DANNOYLIB_MULTITHREADED_BUILD,-std=c++14"
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# annoy has no wheel for Python 3.11, so it compiles here; no compiler reaches the final stages.
# Debian's point releases replace exact versions, so pinning them would break rebuilds.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends g++ \
 && rm -rf /var/lib/apt/lists/* \
 && python -m venv /opt/venv \
 && pip install "pip<26"
WORKDIR /src
COPY requirements.txt constraints.txt ./

FROM ${SERVE_PYTHON_IMAGE} AS build-serve
# The Seldon wrapper's environment: seldon-core 1.19 on Python 3.12, pinned by its own constraints-serve.txt. The
# same compiler set-up as build-base (annoy compiles here too), on the other interpreter.
ARG ANNOY_MARCH=x86-64-v3
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PATH=/opt/venv/bin:$PATH \
    ANNOY_COMPILER_ARGS="-D_CRT_SECURE_NO_WARNINGS,-fpermissive,-march=${ANNOY_MARCH},-O3,-ffast-math,-fno-associative-math,-DANNOYLIB_MULTITHREADED_BUILD,-std=c++14"
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends g++ \
 && rm -rf /var/lib/apt/lists/* \
 && python -m venv /opt/venv \
 && pip install "pip<26"
WORKDIR /src
# The server runs the bundle's model.onnx in ONNX Runtime: no torch (the CUDA build alone is ~5 GB).
COPY requirements-serve.txt constraints-serve.txt ./
RUN pip install -r requirements-serve.txt -c constraints-serve.txt
COPY pyproject.toml README.md ./
COPY imgsim ./imgsim
RUN pip install --no-deps .

FROM build-base AS build-serve-v2
# MLServer's environment: its own requirements and constraints (each environment pins its own set).
COPY requirements-serve-v2.txt constraints-serve-v2.txt ./
RUN pip install -r requirements-serve-v2.txt -c constraints-serve-v2.txt
COPY pyproject.toml README.md ./
COPY imgsim ./imgsim
RUN pip install --no-deps .

FROM build-base AS build-pipeline
COPY requirements-cluster.txt ./
RUN pip install -r requirements.txt -r requirements-cluster.txt -c constraints.txt
COPY pyproject.toml README.md ./
COPY imgsim ./imgsim
RUN pip install --no-deps .

FROM ${PYTHON_IMAGE} AS runtime
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="imgsim" \
      org.opencontainers.image.description="Image-similarity search: ResNet embeddings, Annoy, MLflow, Seldon Core" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://example.invalid/imgsim"
# libstdc++ for annoy's extension; uid/gid 8888 is Seldon's convention for non-root model images.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends libstdc++6 \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 8888 imgsim \
 && useradd --system --uid 8888 --gid 8888 --home-dir /tmp --no-create-home --shell /usr/sbin/nologin imgsim
ENV PATH=/opt/venv/bin:$PATH PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 HOME=/tmp MPLCONFIGDIR=/tmp/matplotlib

FROM runtime AS pipeline
COPY --from=build-pipeline /opt/venv /opt/venv
WORKDIR /app
COPY MLproject python_env.yaml ./
COPY pipelines ./pipelines
USER 8888:8888
CMD ["imgsim", "--help"]

FROM runtime AS serve-v2
COPY --from=build-serve-v2 /opt/venv /opt/venv
WORKDIR /app/model_server/v2
COPY model_server/v2/imgsim_v2.py model_server/v2/imgsim_v2_metrics.py model_server/v2/serve.py \
     model_server/v2/model-settings.json \
     model_server/v2/settings.json ./
USER 8888:8888
# REST, gRPC, Prometheus metrics (MLServer's defaults; the chart moves them to Seldon's 9000, 9500 and 6000).
EXPOSE 8080 8081 8082
# MLServer writes metrics and environments under its working directory unless told otherwise: /tmp, as the
# root file system is read-only.
ENV IMGSIM_MODEL_URI=/mnt/models MLSERVER_METRICS_DIR=/tmp/mlserver-metrics MLSERVER_ENVIRONMENTS_DIR=/tmp/mlserver-envs
HEALTHCHECK NONE
# MLServer's own command line, behind imgsim's request-size and UTF-8 guard (serve.py).
CMD ["python", "serve.py", "start", "."]

# The serve image's runtime: the same as runtime, on the Python its environment was built with.
FROM ${SERVE_PYTHON_IMAGE} AS runtime-serve
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="imgsim" \
      org.opencontainers.image.description="Image-similarity search: ResNet embeddings, Annoy, MLflow, Seldon Core" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://example.invalid/imgsim"
# libstdc++ for annoy's extension; uid/gid 8888 is Seldon's convention for non-root model images.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends libstdc++6 \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 8888 imgsim \
 && useradd --system --uid 8888 --gid 8888 --home-dir /tmp --no-create-home --shell /usr/sbin/nologin imgsim
ENV PATH=/opt/venv/bin:$PATH PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 HOME=/tmp MPLCONFIGDIR=/tmp/matplotlib

FROM runtime-serve AS serve
COPY --from=build-serve /opt/venv /opt/venv
WORKDIR /app/model_server
COPY model_server/*.py ./
USER 8888:8888
# REST, gRPC, Prometheus metrics (Seldon's python wrapper defaults).
EXPOSE 9000 5000 6000
ENV IMGSIM_MODEL_URI=/mnt/models
HEALTHCHECK NONE
CMD ["seldon-core-microservice", "ModelServer", "--service-type", "MODEL"]
