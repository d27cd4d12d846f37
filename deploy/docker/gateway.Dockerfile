# syntax=docker/dockerfile:1
# LoRA Fleet gateway: the OpenAI-compatible HTTP API. Slim on purpose: no torch, no vLLM.
# Build from the repository root:  docker build -f deploy/docker/gateway.Dockerfile -t lorafleet/gateway:0.1.0 .
ARG PYTHON_IMAGE=python:3.11.13-slim-bookworm

# Stage 1: wheels of our own packages (the source never reaches the final image).
FROM ${PYTHON_IMAGE} AS wheels
WORKDIR /src
COPY services/common services/common
COPY services/gateway services/gateway
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels services/common services/gateway

# Stage 2: a virtualenv with the wheels and their pinned dependencies.
FROM ${PYTHON_IMAGE} AS venv
COPY requirements/constraints.txt /constraints/repo.txt
COPY deploy/docker/constraints.txt /constraints/images.txt
COPY --from=wheels /wheels /wheels
RUN python -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-cache-dir -c /constraints/repo.txt -c /constraints/images.txt /wheels/*.whl

# Stage 3: the runtime, as a non-root user.
FROM ${PYTHON_IMAGE}
ARG UID=10001
RUN groupadd --system --gid ${UID} lorafleet \
 && useradd --system --uid ${UID} --gid ${UID} --home-dir /var/lib/lorafleet --shell /usr/sbin/nologin lorafleet \
 && install -d -o ${UID} -g ${UID} /var/lib/lorafleet
COPY --from=venv /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/var/lib/lorafleet \
    LORAFLEET_HOME=/var/lib/lorafleet \
    LORAFLEET_GATEWAY_HOST=0.0.0.0 \
    LORAFLEET_GATEWAY_PORT=8000
WORKDIR /var/lib/lorafleet
USER ${UID}:${UID}
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD python -m lorafleet_common.healthcheck http "http://127.0.0.1:${LORAFLEET_GATEWAY_PORT}/ready"
ENTRYPOINT ["python", "-m", "lorafleet_gateway"]
