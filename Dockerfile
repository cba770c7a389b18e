# One image for the three services (and the agent); docker compose picks the module per service.
FROM python:3.11-slim
WORKDIR /app
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 HOSTISO_HTTP_HOST=0.0.0.0
COPY pyproject.toml README.md ./
COPY shared ./shared
COPY services ./services
COPY agent ./agent
COPY infra ./infra
RUN pip install --no-cache-dir .
RUN useradd --system --uid 10001 hostiso
USER hostiso
CMD ["python", "-m", "services.settings"]
