# syntax=docker/dockerfile:1
#
# Two images from one file:
#   docker build --target gateway -t imagegate-gateway .   # slim: no torch; fronts remote workers
#   docker build --target worker  -t imagegate-worker  .   # CUDA: runs `imagegate serve` with local GPU workers,
#                                                          # or `imagegate worker` for a gateway elsewhere
# Both run as the unprivileged user `imagegate` and keep models, image files and secrets in the /data volume.

ARG PYTHON_VERSION=3.12

# ---- build: the imagegate wheel (gateway code and contract) -----------------------------------------------------
FROM python:${PYTHON_VERSION}-slim AS build
WORKDIR /src
COPY pyproject.toml README.md openapi.yaml ./
COPY schemas ./schemas
COPY app ./app
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

# ---- gateway: HTTP surface, auth, routing, metrics; no torch -----------------------------------------------------
FROM python:${PYTHON_VERSION}-slim AS gateway
RUN groupadd --system --gid 10001 imagegate \
    && useradd --system --uid 10001 --gid 10001 --create-home --home-dir /home/imagegate imagegate \
    && mkdir /data && chown imagegate:imagegate /data
COPY --from=build /wheels /tmp/wheels
RUN pip install --no-cache-dir /tmp/wheels/*.whl && rm -rf /tmp/wheels
USER 10001:10001
ENV IMAGEGATE_HOST=0.0.0.0 IMAGEGATE_DATA_DIR=/data PYTHONUNBUFFERED=1
VOLUME ["/data"]
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health')"]
ENTRYPOINT ["imagegate"]
CMD ["serve"]

# ---- worker: diffusers + CUDA torch ------------------------------------------------------------------------------
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 AS worker
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu128
ARG TORCH_VERSION=2.13.0
# The distribution's python3 follows its security updates; pinning it would break rebuilds.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/imagegate
ENV PATH=/opt/imagegate/bin:$PATH
COPY --from=build /wheels /tmp/wheels
# torch first, from the CUDA index, so the worker extra does not pull another build.
RUN pip install --no-cache-dir "torch==${TORCH_VERSION}" --index-url ${TORCH_INDEX} \
    && pip install --no-cache-dir "$(ls /tmp/wheels/*.whl)[worker]" \
    && rm -rf /tmp/wheels
RUN groupadd --system --gid 10001 imagegate \
    && useradd --system --uid 10001 --gid 10001 --create-home --home-dir /home/imagegate imagegate \
    && mkdir /data && chown imagegate:imagegate /data
USER 10001:10001
ENV IMAGEGATE_HOST=0.0.0.0 IMAGEGATE_DATA_DIR=/data HF_HOME=/data/hf PYTHONUNBUFFERED=1
VOLUME ["/data"]
EXPOSE 8000 9000
ENTRYPOINT ["imagegate"]
CMD ["serve"]
