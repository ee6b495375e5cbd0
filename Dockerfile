# Ocellus serving image: FastAPI + ONNX Runtime, no training stack, no compilers, runs as a non-root user.
#
#   docker build -t ocellus .
#   docker run --rm -p 8000:8000 ocellus                                # the baked-in models/
#   docker run --rm -p 8000:8000 -v "$PWD/models:/app/models:ro" ocellus   # a model repository from the host
#   docker run -p 8000:8000 -v ocellus-data:/app/data ocellus          # the SQLite gallery kept in a named volume
#
# Without a volume on /app/data the embedded gallery lives and dies with the container. A named volume takes the
# folder's owner (uid 10001); a host folder mounted there must be writable by uid 10001, else gallery calls are 503s.
# Written for the classic builder as well as BuildKit (docker-compose 1.29 builds with the classic one),
# so no RUN --mount and no "# syntax" line.

# ---- builder: a virtual environment holding the service and its runtime dependencies -------------
FROM python:3.11-slim AS builder

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /src
# .dockerignore lets through only pyproject.toml, README.md (the package's readme), service/ and models/.
COPY . .
# Non-editable, so the venv holds the package itself; the `postgres` extra is psycopg[binary] (a wheel with
# libpq inside, nothing to compile). No `train` extra: the service needs none of it.
# models/ may be absent in a checkout without trained models; the image then starts with an empty repository.
RUN pip install ".[postgres]" \
    && mkdir -p /src/models

# ---- final: the venv, the model repository and nothing else -----------------------------------------
FROM python:3.11-slim

# Installed into site-packages, service/settings.py cannot find a checkout's models/ and falls back to
# ./models relative to the working directory; the path is set explicitly instead.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    OCELLUS_HOST=0.0.0.0 \
    OCELLUS_PORT=8000 \
    OCELLUS_MODELS_DIR=/app/models \
    OCELLUS_DATA_DIR=/app/data

RUN groupadd --system --gid 10001 ocellus \
    && useradd --system --uid 10001 --gid ocellus --home-dir /app --no-create-home --shell /usr/sbin/nologin ocellus

WORKDIR /app
COPY --from=builder /opt/venv /opt/venv
# The model repository is baked in, owned by root and read-only for the service; mount a volume over
# /app/models to serve other models (POST /v1/models/reload picks up changes).
COPY --from=builder /src/models /app/models
# The only place the service may write (the embedded SQLite gallery when no OCELLUS_GALLERY_URL is set).
RUN mkdir -p /app/data && chown ocellus:ocellus /app/data

# Numeric, so that orchestrators can check runAsNonRoot.
USER 10001:10001

EXPOSE 8000
# /readyz answers 200 once at least one model is loaded (503 before); slim images have no curl.
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/readyz' % os.environ.get('OCELLUS_PORT', '8000'), timeout=4)"]
# uvicorn drains in-flight requests for up to OCELLUS_SHUTDOWN_GRACE_S (35 s, above the 30 s request timeout) on
# SIGTERM; give the container a longer stop timeout than that (docker stop -t 40, compose stop_grace_period).
STOPSIGNAL SIGTERM
CMD ["python", "-m", "service"]
