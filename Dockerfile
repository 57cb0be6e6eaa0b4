# syntax=docker/dockerfile:1
# One image for every role of the platform; `vision` is the entry point and the role its subcommand:
#   docker run IMAGE serve --services classification      # a gRPC service (chart: one Deployment each)
#   docker run IMAGE worker --queues train                # a Celery worker (jobs)
#   docker run IMAGE export-triton --model efficientnet_lite0 --repository /models --flavour gpu-onnxruntime
# Targets (the chart's image.tag, "-slim" and "-mlflow" suffixes):
#   full   (default) torch + torchvision + timm + ONNX Runtime: exports the bundled model to ONNX at start,
#          runs workers and export-triton.               docker build -t vision:0.1.0 .
#   slim   no torch: services on --backend triton, or on pre-exported ONNX files (a model's onnx=).
#                                                         docker build --target slim -t vision:0.1.0-slim .
#   mlflow the registry's MLflow tracking server with the PostgreSQL driver (psycopg 3).
#                                                         docker build --target mlflow -t vision:0.1.0-mlflow .
# Every target runs as the unprivileged user 10001 (the chart's podSecurityContext.runAsUser) and works with
# a read-only root filesystem: caches go to /var/cache/vision and /tmp, which the chart mounts as emptyDirs.

# Pinned to a patch release; pin the digest too (python:3.11.11-slim-bookworm@sha256:...) in the registry
# that builds it.
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    HOME=/tmp \
    XDG_CACHE_HOME=/var/cache/vision \
    VISION_ONNX_CACHE=/var/cache/vision/onnx
RUN groupadd --gid 10001 vision \
    && useradd --no-create-home --uid 10001 --gid vision --home-dir /tmp --shell /usr/sbin/nologin vision \
    && install -d -o vision -g vision /var/cache/vision

# Dependencies, at the versions pyproject.toml pins, installed before the code is copied (a code change
# does not reinstall them). scripts/requirements.py names each role's set: slim = the core + onnx (no torch,
# scipy, scikit-image, MLflow or Celery: a service on ONNX files or in front of Triton imports none of them);
# full = every extra.
FROM base AS deps-slim
WORKDIR /src
COPY pyproject.toml ./
COPY scripts/requirements.py ./scripts/
RUN python -m venv /opt/venv \
    && python scripts/requirements.py slim > /tmp/requirements-slim.txt \
    && python scripts/requirements.py full > /tmp/requirements-full.txt \
    && pip install --no-cache-dir -r /tmp/requirements-slim.txt

FROM deps-slim AS deps-full
RUN pip install --no-cache-dir -r /tmp/requirements-full.txt

FROM deps-slim AS build-slim
COPY README.md ./
COPY services ./services
COPY loadtest ./loadtest
COPY training ./training
COPY scripts/prune-venv.sh ./scripts/
RUN pip install --no-cache-dir --no-deps . && sh scripts/prune-venv.sh

FROM deps-full AS build-full
COPY README.md ./
COPY services ./services
COPY loadtest ./loadtest
COPY training ./training
COPY scripts/prune-venv.sh ./scripts/
RUN pip install --no-cache-dir --no-deps . && sh scripts/prune-venv.sh

FROM base AS mlflow
# mlflow 3.17.2 with the store stack pyproject.toml pins for the registry (SQLAlchemy 2.1 + psycopg 3: 2.1's
# default driver for postgresql:// URIs; this set resolves together); MLflow's own image has no PostgreSQL
# driver. Add boto3 here for an s3:// artifact store.
RUN python -m venv /opt/venv \
    && pip install --no-cache-dir mlflow==3.17.2 sqlalchemy==2.1.9 alembic==1.20.1 "psycopg[binary]==3.3.9"
USER 10001:10001
EXPOSE 5000
ENTRYPOINT ["mlflow"]
CMD ["server", "--host", "0.0.0.0", "--port", "5000"]

FROM base AS slim
COPY --from=build-slim /opt/venv /opt/venv
USER 10001:10001
EXPOSE 50051 9464
ENTRYPOINT ["vision"]
CMD ["serve", "--host", "0.0.0.0"]

# Last stage: the default target.
FROM base AS full
COPY --from=build-full /opt/venv /opt/venv
USER 10001:10001
EXPOSE 50051 9464
ENTRYPOINT ["vision"]
CMD ["serve", "--host", "0.0.0.0"]
