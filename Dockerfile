# dermsight web app: docker build -t dermsight . && docker run --rm -p 8000:8000 dermsight
# (podman and buildah read this file the same way.)
#
# Two stages: the first builds the wheel and installs it, with its serving dependencies only (no PyTorch: the bundled
# model serves from its ONNX export), into a virtual environment; the second copies that environment into a clean
# slim image, without pip's build tools or caches.
# PYTHON_IMAGE: any image with Python 3.11 and its venv module (a registry's python:3.11-slim by default; where no
# registry can be reached, Debian bookworm's python3 and python3-venv, imported with `podman import`).
ARG PYTHON_IMAGE=python:3.11-slim
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY src ./src
# The redis extra: DERMSIGHT_RATE_LIMIT_STORAGE=redis://... shares the rate limit between containers.
RUN python3 -m venv /opt/dermsight \
 && /opt/dermsight/bin/pip install '.[redis]'

FROM ${PYTHON_IMAGE}
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PATH=/opt/dermsight/bin:$PATH
COPY --from=build /opt/dermsight /opt/dermsight
RUN useradd --create-home --uid 10001 dermsight
WORKDIR /app
COPY gunicorn.conf.py ./
USER dermsight
ENV PORT=8000
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s \
  CMD python -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('PORT', '8000'), timeout=4)"
# Set DERMSIGHT_SECRET_KEY when running several containers behind one address (see the README); deploy/nginx.conf is
# the buffering proxy to put in front (docs/deployment.md).
CMD ["gunicorn", "-c", "gunicorn.conf.py", "dermsight.web:create_app()"]
