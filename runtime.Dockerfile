# The image skyvault's flow runs execute in (the Docker work pools' `image`).
#
# The locked environment (uv.lock) is installed into /opt/skyvault/venv, the project is baked in
# as a wheel, and flow runs start as the unprivileged user `skyvault` in /opt/skyvault (the
# working directory prefect.yaml's pull step sets).
#
# Build arguments:
#   BASE_IMAGE    an image with Python 3.11 and its venv module (Debian bookworm's python3 or
#                 python:3.11-slim-bookworm); PostgreSQL's client tools (pg_dump, pg_restore, psql,
#                 for the catalog backup and restore flows) are installed with apt when it lacks them
#   PIP_OPTIONS   where wheels come from: the public index by default; scripts/build-runtime-image.sh
#                 passes "--no-index --find-links <folder served on 127.0.0.1>" to build offline
#   UV_VERSION    the uv that turns uv.lock into a hashed requirements file (build stage only)
#
#   docker build -f runtime.Dockerfile -t registry.example.org/skyvault/runtime:1.0.0 .
ARG BASE_IMAGE=python:3.11-slim-bookworm

FROM ${BASE_IMAGE} AS build
ARG PIP_OPTIONS="--index-url https://pypi.org/simple"
ARG UV_VERSION=0.13.9
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PYTHONDONTWRITEBYTECODE=1
RUN python3 -m venv /opt/build \
 && /opt/build/bin/pip install ${PIP_OPTIONS} "uv==${UV_VERSION}"
WORKDIR /src
COPY pyproject.toml uv.lock ./
# Every locked runtime dependency, each checked against the lock's hashes; nothing else.
RUN /opt/build/bin/uv export --frozen --no-dev --no-emit-project --format requirements-txt \
      -o /src/requirements.txt \
 && python3 -m venv /opt/skyvault/venv \
 && /opt/skyvault/venv/bin/pip install ${PIP_OPTIONS} --no-deps --require-hashes -r /src/requirements.txt
COPY README.md ./
COPY skyvault ./skyvault
RUN /opt/build/bin/pip wheel ${PIP_OPTIONS} --no-deps --wheel-dir /dist /src \
 && /opt/skyvault/venv/bin/pip install --no-index --no-deps /dist/skyvault-*.whl

FROM ${BASE_IMAGE} AS runtime
RUN command -v pg_dump >/dev/null \
 || (apt-get update && apt-get install -y --no-install-recommends postgresql-client \
     && rm -rf /var/lib/apt/lists/*)
RUN groupadd --system --gid 10001 skyvault \
 && useradd --system --uid 10001 --gid skyvault --home-dir /opt/skyvault --shell /usr/sbin/nologin skyvault \
 && mkdir -p /opt/skyvault /scratch \
 && chown skyvault:skyvault /opt/skyvault /scratch
COPY --from=build /opt/skyvault/venv /opt/skyvault/venv
ENV PATH=/opt/skyvault/venv/bin:${PATH} \
    PYTHONUNBUFFERED=1 \
    PREFECT_HOME=/opt/skyvault/.prefect \
    PREFECT_SERVER_ANALYTICS_ENABLED=false
LABEL org.opencontainers.image.title="skyvault runtime" \
      org.opencontainers.image.description="skyvault flow runs: locked environment, project baked in"
WORKDIR /opt/skyvault
USER skyvault
RUN python -c "import skyvault.flows.ingest, skyvault.flows.jobs, rasterio; print(rasterio.__gdal_version__)" \
 && pg_dump --version
CMD ["python", "-m", "prefect", "version"]
