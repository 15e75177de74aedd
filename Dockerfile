# syntax=docker/dockerfile:1
#
# fleet-payouts: one image for every role (API, worker, migrations). The `devkit` target
# adds the dev kit (the Billing emulator for compose's demo Billing); production never
# installs it.
#
#   docker build -t fleet-payouts .
#   docker run --rm -e DATABASE_URL=... fleet-payouts migrate
#   docker run -d -p 8080:8080 -e DATABASE_URL=... fleet-payouts            # serve (default CMD)
#   docker run -d -e DATABASE_URL=... fleet-payouts worker --metrics-port 9100
#
# Run it with an init process (`docker run --init`, `init: true` in compose) so that
# SIGTERM reaches the Python process and the graceful shutdown (~60 s) can complete:
# give it a stop timeout of at least 75 s.

ARG PYTHON_IMAGE=python:3.11-slim

# --------------------------------------------------------------------------- build
FROM ${PYTHON_IMAGE} AS build

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

# Self-contained virtualenv, copied as a whole into the runtime stage
# (same base image, so its interpreter symlinks stay valid).
RUN python -m venv /opt/venv
ENV PATH="/opt/venv/bin:${PATH}"

WORKDIR /src
# The whole (filtered, see .dockerignore) context: pyproject.toml, service/, sql/,
# migrations/ and whatever else the setuptools build may come to need.
COPY . .
RUN pip install --no-cache-dir . \
 && test -x /opt/venv/bin/fleet-payouts

# ------------------------------------------------------------------------- runtime
FROM ${PYTHON_IMAGE} AS runtime

LABEL org.opencontainers.image.title="fleet-payouts" \
      org.opencontainers.image.description="Pays taxi fleet companies (parks) the money they have earned, exactly once."

ENV PATH="/opt/venv/bin:${PATH}" \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HOME=/home/app

RUN groupadd --system --gid 10001 app \
 && useradd --system --uid 10001 --gid app --create-home --home-dir /home/app \
        --shell /usr/sbin/nologin app

COPY --from=build /opt/venv /opt/venv

# The SQL files ship inside the installed package; a copy also lives in the working
# directory for operators (and for any lookup relative to the current directory).
WORKDIR /app
COPY sql/ ./sql/
COPY migrations/ ./migrations/

# numeric, so that runAsNonRoot-style checks can verify it (uid of "app" above)
USER 10001:10001

# 8080: HTTP API (serve) · 9100: worker /metrics (worker --metrics-port 9100)
EXPOSE 8080 9100

# No curl in slim images: probe with the standard library: /ready (the database answers).
# HEALTHCHECK_URL lets other roles reuse it (e.g. http://127.0.0.1:9100/metrics for a worker); compose overrides it.
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(os.environ.get('HEALTHCHECK_URL', 'http://127.0.0.1:8080/ready'), timeout=4)"]

STOPSIGNAL SIGTERM

ENTRYPOINT ["fleet-payouts"]
CMD ["serve", "--host", "0.0.0.0"]

# -------------------------------------------------------------------------- devkit
# The runtime image plus the dev kit (devkit/): `fleet-payouts billing-emulator` for
# compose's stand-in Billing. Build it with `--target devkit`; never deploy it.
FROM build AS devkit-build
RUN pip install --no-cache-dir --no-deps ./devkit

FROM runtime AS devkit
COPY --from=devkit-build /opt/venv /opt/venv

# ---------------------------------------------------------------------- production
# The last stage is what `docker build .` makes: the runtime image, without the dev kit.
FROM runtime AS production
