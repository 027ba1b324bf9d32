# syntax=docker/dockerfile:1
# natsconn image: `docker build -t natsconn:0.1.0 .`
#   --build-arg EXTRAS=all            plugin extras: kafka, redis, postgres, all
#                                     ("kafka,redis" for two, "" for NATS only)
#   --build-arg PYTHON_VERSION=3.11
#   --build-arg BASE_IMAGE=...        another base with python/pip on PATH for both stages
#                                     (scripts/image builds one from debootstrap where no
#                                     registry is reachable); default python:3.11-slim
# Runs as uid/gid 10001 and reads /etc/natsconn/pipeline.yaml (the Helm chart mounts it
# there); /healthz /readyz /metrics on port 8080.
ARG PYTHON_VERSION=3.11
ARG BASE_IMAGE=

# ---- build: one wheel of natsconn (connector + the built-in plugins) ----
FROM ${BASE_IMAGE:-python:${PYTHON_VERSION}-slim} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY connector ./connector
COPY plugins ./plugins
RUN python -m pip wheel --no-deps --wheel-dir /wheels .

# ---- runtime ----
FROM ${BASE_IMAGE:-python:${PYTHON_VERSION}-slim}
ARG EXTRAS=all
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN groupadd --system --gid 10001 natsconn \
 && useradd --system --uid 10001 --gid 10001 --home-dir /home/natsconn --create-home \
      --shell /usr/sbin/nologin natsconn \
 && mkdir -p /etc/natsconn
# Install from the wheel by path, so no same-named package from an index can replace it.
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    set -eu; \
    wheel="$(ls /wheels/natsconn-*.whl)"; \
    if [ -n "$EXTRAS" ]; then spec="natsconn[$EXTRAS] @ file://$wheel"; \
    else spec="natsconn @ file://$wheel"; fi; \
    python -m pip install "$spec"; \
    natsconn plugins
LABEL org.opencontainers.image.title="natsconn" \
      org.opencontainers.image.description="Bridge NATS and JetStream to Kafka, Redis and PostgreSQL" \
      org.opencontainers.image.licenses="Apache-2.0"
USER 10001:10001
WORKDIR /home/natsconn
EXPOSE 8080
ENTRYPOINT ["natsconn"]
CMD ["run", "/etc/natsconn/pipeline.yaml"]
