# syntax=docker/dockerfile:1
# Build stage: build a wheel with all dependencies.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY fhirserver ./fhirserver
RUN pip install --no-cache-dir --upgrade pip build \
 && pip wheel --no-cache-dir --wheel-dir /wheels ".[postgres]"

# Runtime stage: no compilers, non-root user, data in a volume.
FROM python:3.11-slim
# Pango for the portal's PDF health summary (WeasyPrint) and Noto Sans CJK for its Chinese pages
# (scripts/ensure_pango.sh installs the same on a test machine)
RUN apt-get update \
 && apt-get install -y --no-install-recommends libpangoft2-1.0-0 fonts-noto-cjk \
 && rm -rf /var/lib/apt/lists/*
RUN useradd --system --uid 10001 --home-dir /data --shell /usr/sbin/nologin fhir \
 && mkdir -p /data /app \
 && chown fhir /data
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
COPY profiles /app/profiles
ENV FHIRSERVER_DATA_DIR=/data \
    FHIRSERVER_PROFILES_DIR=/app/profiles \
    FHIRSERVER_BASE_URL=http://localhost:8080/fhir \
    PYTHONDONTWRITEBYTECODE=1
USER fhir
VOLUME ["/data"]
EXPOSE 8080
HEALTHCHECK --interval=30s --timeout=5s CMD python -c "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8080/healthz').status == 200 else 1)"
# `serve` applies migrations, then runs gunicorn (gthread workers).
CMD ["fhirserver", "serve", "--host", "0.0.0.0", "--port", "8080", "--workers", "4", "--threads", "2"]
