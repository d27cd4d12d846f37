"""Real service processes and a restartable S3 store for the fault-injection tests.

Each service runs as ``python -m lorafleet_<service>`` in its own session (process group), as
``make up`` starts it, so a test can SIGKILL exactly one process, or the whole group as a dead
node would lose it. The object store is moto's S3 server on a fixed loopback port: ``stop()``
closes the port (clients get "connection refused", as from a stopped MinIO) and ``start()``
serves the same port again with the same objects (moto keeps its buckets in this test process,
as MinIO keeps them on its volume).
"""

from __future__ import annotations

import json
import os
import signal
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from safetensors.numpy import save_file

from lorafleet_common.adapters import AdapterMetadata, publish_adapter, sha256_file
from lorafleet_common.settings import EMBEDDED_BASE_MODEL
from lorafleet_common.store import S3Store, make_client
from tests.conftest import MODEL_CACHE, free_port
from tests.service_processes import ServiceProcess, http_probe, start_service

ADMIN_KEY = "lf-faults-admin-key-0123456789"
S3_ACCESS_KEY, S3_SECRET_KEY = "test", "testsecret"


class RestartableS3:
    """moto's S3 server on a fixed port that a test can stop and start again with the same data."""

    def __init__(self) -> None:
        self.port = free_port()
        self.bucket = f"faults-{uuid.uuid4().hex[:8]}"  # moto's backend is per process: other suites' buckets exist
        self._server: Any = None
        self.start()
        client = make_client(self.endpoint, S3_ACCESS_KEY, S3_SECRET_KEY, secure=False, region=None, timeout_s=5)
        client.make_bucket(self.bucket)
        self.store = S3Store(client, self.bucket)

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        from moto.server import ThreadedMotoServer

        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self._server.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None

    def env(self) -> dict[str, str]:
        """The shared LORAFLEET_* variables that point a service at this store (5 s per store call)."""
        return {
            "LORAFLEET_STORE_URL": f"s3://{self.bucket}",
            "LORAFLEET_S3_ENDPOINT": self.endpoint,
            "LORAFLEET_S3_ACCESS_KEY": S3_ACCESS_KEY,
            "LORAFLEET_S3_SECRET_KEY": S3_SECRET_KEY,
            "LORAFLEET_STORE_TIMEOUT_S": "5",
        }


def service_home(root: Path) -> Path:
    """A LORAFLEET_HOME whose model cache is the shared one (the embedded model is converted once per machine)."""
    root.mkdir(parents=True, exist_ok=True)
    models = root / "models"
    if not models.exists():
        models.symlink_to(MODEL_CACHE, target_is_directory=True)
    return root


def start(service: str, home: Path, env: Mapping[str, str], name: str | None = None) -> ServiceProcess:
    """``python -m lorafleet_<service>`` with the admin key and ``env``, logging to ``<home>/logs/<name>.log``."""
    full = {"LORAFLEET_HOME": str(home), "LORAFLEET_ADMIN_KEY": ADMIN_KEY, **env}
    return start_service(service, full, home / "logs" / (name or service))


def sigkill_main(proc: ServiceProcess) -> None:
    """SIGKILL the service process alone: no handler, no drain, no goodbye to anyone."""
    os.kill(proc.pid, signal.SIGKILL)
    proc.popen.wait(timeout=10)


def start_gateway(
    home: Path, s3: RestartableS3, inference_ports: list[int], trainer_port: int, port: int | None = None, **env: str
) -> tuple[ServiceProcess, str]:
    """A gateway process on ``port`` (a free one by default), its SQLite database under ``home``; (process, URL)."""
    port = port or free_port()
    gateway = start(
        "gateway",
        home,
        {
            **s3.env(),
            "LORAFLEET_GATEWAY_PORT": str(port),
            "LORAFLEET_GATEWAY_INFERENCE_TARGETS": ",".join(f"127.0.0.1:{p}" for p in inference_ports),
            "LORAFLEET_GATEWAY_TRAINER_TARGET": f"127.0.0.1:{trainer_port}",
            "LORAFLEET_GATEWAY_DATABASE_URL": f"sqlite:///{home / 'gateway.db'}",
            "LORAFLEET_GATEWAY_CONNECT_TIMEOUT_S": "1",
            "LORAFLEET_GATEWAY_HEALTH_INTERVAL_S": "0.5",
            **env,
        },
    )
    url = f"http://127.0.0.1:{port}"
    gateway.wait_ready(http_probe(f"{url}/health"), 90)
    return gateway, url


# ----- adapters with the embedded model's real shapes ---------------------------------------------


def write_adapter(folder: Path, model_path: Path, *, seed: int, layers: int = 3, rank: int = 8) -> Path:
    """A PEFT LoRA on q_proj and v_proj of the first ``layers`` layers of the embedded model: vLLM loads it,
    and it stays small (about 60 KiB per layer) so a tiny filesystem holds a few."""
    config = json.loads((model_path / "config.json").read_text())
    hidden = int(config["hidden_size"])
    head_dim = int(config.get("head_dim") or hidden // int(config["num_attention_heads"]))
    kv_out = int(config["num_key_value_heads"]) * head_dim
    rng = np.random.default_rng(seed)
    tensors: dict[str, np.ndarray] = {}
    for layer in range(layers):
        for proj, out in (("q_proj", hidden), ("v_proj", kv_out)):
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{proj}"
            tensors[f"{prefix}.lora_A.weight"] = rng.standard_normal((rank, hidden), dtype=np.float32) * 0.02
            tensors[f"{prefix}.lora_B.weight"] = rng.standard_normal((out, rank), dtype=np.float32) * 0.02
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    peft_config = {
        "peft_type": "LORA",
        "r": rank,
        "lora_alpha": 2 * rank,
        "target_modules": ["q_proj", "v_proj"],
        "bias": "none",
        "use_dora": False,
        "modules_to_save": None,
        "base_model_name_or_path": EMBEDDED_BASE_MODEL,
    }
    (folder / "adapter_config.json").write_text(json.dumps(peft_config))
    return folder


def publish_folder(store: S3Store, folder: Path, name: str, version: str = "v1", sha256: str | None = None) -> None:
    """Publish ``folder`` as ``name@version`` (LATEST); ``sha256`` overrides the weights' real digest."""
    metadata = AdapterMetadata(
        name=name,
        version=version,
        base_model=EMBEDDED_BASE_MODEL,
        rank=8,
        alpha=16,
        target_modules=["q_proj", "v_proj"],
        sha256=sha256 or sha256_file(folder / "adapter_model.safetensors"),
    )
    publish_adapter(store, folder, metadata)


def chat(url: str, model: str, *, max_tokens: int = 4, timeout_s: float = 60.0) -> tuple[int, dict[str, Any], float]:
    """POST /v1/chat/completions with the admin key; (status, JSON body, seconds)."""
    started = time.monotonic()
    response = httpx.post(
        f"{url}/v1/chat/completions",
        headers={"Authorization": f"Bearer {ADMIN_KEY}"},
        json={"model": model, "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": max_tokens},
        timeout=timeout_s,
    )
    return response.status_code, response.json(), time.monotonic() - started
