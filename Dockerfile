# syntax=docker/dockerfile:1
# One image for the three services, the agent (simulated mode) and the CLI; the command picks
# which (`python -m services.settings`, `python -m agent --simulated …`, `hostiso …`).
#
# Stage 1 builds the project's wheel (package data included: the portal's static files) and the
# wheels of its pinned runtime dependencies; stage 2 installs only those, offline, into a slim
# image. No source tree in the runtime image: the code runs from site-packages.
ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY shared ./shared
COPY services ./services
COPY agent ./agent
COPY cli ./cli
COPY portal ./portal
COPY bench ./bench
RUN pip wheel --wheel-dir /wheels .

FROM ${PYTHON_IMAGE} AS runtime
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 HOSTISO_HTTP_HOST=0.0.0.0
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-index --find-links=/wheels hostiso
COPY --chmod=0755 infra/docker/entrypoint.sh /usr/local/bin/hostiso-entrypoint
COPY --chmod=0755 infra/docker/enrollment-key.sh /usr/local/bin/hostiso-enrollment-key
# A non-root user; its home holds the agents' state and the enrollment key (compose volumes).
RUN useradd --system --uid 10001 --create-home --home-dir /var/lib/hostiso hostiso \
    && install -d -o hostiso -g hostiso -m 0700 /var/lib/hostiso/keys /var/lib/hostiso/agents
USER hostiso
WORKDIR /var/lib/hostiso
ENTRYPOINT ["/usr/local/bin/hostiso-entrypoint"]
CMD ["python", "-m", "services.settings"]
