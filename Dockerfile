# The M2FP pre-labeling backend (Label Studio ML backend + demo page/API + batch worker), CPU only.
#   docker build -t m2fp-prelabel .
#   docker run -p 9090:9090 -v m2fp-models:/models m2fp-prelabel            # gunicorn on :9090
#   docker run ... m2fp-prelabel python -m backend.batch.worker             # an RQ batch worker
# docker-compose.yml wires it to Label Studio and Redis (docs/deployment.md).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# No apt packages: the wheels (torch CPU, opencv-python-headless, numpy, pillow) bundle their native libraries
# and need only what the slim image has (libc, libstdc++, zlib).

WORKDIR /app

# torch first, pinned, from PyTorch's CPU index ONLY: PyPI's torch wheel pulls ~3 GB of CUDA libraries, and
# with PyPI as an extra index pip could prefer that wheel. Nothing in requirements.txt asks for another torch.
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0

# label-studio-ml 1.0.9 (the only release on PyPI) pins Flask 1.1.2 / Werkzeug 2.0.2, releases with public
# CVEs; it runs on the current ones from requirements.txt, so it comes without its dependencies.
COPY requirements.txt ./
RUN pip install -r requirements.txt \
    && pip install --no-deps label-studio-ml==1.0.9

COPY pyproject.toml model.py _wsgi.py gunicorn.conf.py ./
COPY backend ./backend
# Editable, without dependencies (all installed above): gives the `m2fp-prelabel` command and serves
# backend/static from /app as in a checkout.
RUN pip install --no-deps -e . \
    && useradd --create-home --uid 1000 --shell /usr/sbin/nologin app \
    && mkdir -p /models \
    && chown app:app /models

# Defaults; docker-compose.yml and `docker run -e` override them (every variable: README / backend/settings.py).
# The model downloads from ModelScope into M2FP_CACHE_DIR on first start (a volume: once, not per container).
ENV M2FP_MODEL=damo/cv_resnet101_image-multiple-human-parsing \
    M2FP_MODEL_REVISION=v1.0.1 \
    M2FP_CACHE_DIR=/models \
    M2FP_DEVICE=cpu \
    GUNICORN_WORKERS=1 \
    GUNICORN_THREADS=4 \
    LOG_LEVEL=INFO

# Created above and owned by `app`, so a fresh named volume mounted here is writable by the non-root user.
VOLUME ["/models"]

USER app
EXPOSE 9090

# start-period covers the first start's weight download (several hundred MB) and the model load.
HEALTHCHECK --interval=30s --timeout=10s --start-period=600s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9090/health', timeout=8)"]

# Binds 0.0.0.0:9090 (gunicorn.conf.py); workers/threads/timeout from GUNICORN_* variables.
CMD ["gunicorn", "-c", "gunicorn.conf.py", "_wsgi:app"]
