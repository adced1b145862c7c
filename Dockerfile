# dermsight web app: docker build -t dermsight . && docker run --rm -p 8000:8000 dermsight
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app

# CPU-only torch: the default PyPI wheels for Linux pull in several GB of CUDA libraries a CPU server never uses.
# The redis extra: DERMSIGHT_RATE_LIMIT_STORAGE=redis://... shares the rate limit between containers.
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install --extra-index-url "$TORCH_INDEX" '.[redis]' \
 && useradd --create-home --uid 10001 dermsight
COPY gunicorn.conf.py ./

USER dermsight
ENV PORT=8000
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s \
  CMD python -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('PORT', '8000'), timeout=4)"
# Set DERMSIGHT_SECRET_KEY when running several containers behind one address (see the README).
CMD ["gunicorn", "-c", "gunicorn.conf.py", "dermsight.web:create_app()"]
