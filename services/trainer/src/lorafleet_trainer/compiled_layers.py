"""``training.compile``: torch.compile of the decoder layers, one layer at a time (regional compilation).

Why: a forward and backward pass of a 7B model in eager PyTorch is thousands of small kernels, each launched by
Python through transformers' and PEFT's module code. At one 2,048-token pack per forward the host, not the GPU,
sets the pace (docs/benchmarks.md, "H100, run 2"). Compiled, a layer is a few fused kernels launched from
generated code.

How:

- Every decoder layer runs the same code, so dynamo traces it and the backend compiles it once; the other layers
  reuse the graph (their weights are the graph's inputs). While compiled, the embeddings' output requires a
  gradient (as under gradient checkpointing): otherwise the first layer's input would differ from the others'
  and get a graph of its own.
- Shapes: packed micro-batches are padded to ``max_length`` (the caller's ``fixed_width``), so all but an epoch's
  last (fewer packs) have one shape: ``dynamic=False``. The rows' boundaries (``cu_seq_lens``, varlen
  attention) vary in number from batch to batch: that one dimension is marked dynamic (``prepare``), and the
  longest row is given as the pack's width, which flash varlen kernels take as an upper bound. Padded
  micro-batches vary in width: compiled with dynamic shapes.
- The compiled code runs only inside ``active()``, around training micro-batches: evaluation (other shapes, no
  gradient) stays eager rather than compiling graphs of its own.
- A compilation failure, or a failure of the compiled code, must not cost the job: ``run_with_eager_fallback``
  logs it, puts the layers back to eager for good, and redoes the whole optimizer step eagerly, with the step's
  gradients cleared and the RNG state restored, so the step is the one an eager run would take.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch

log = logging.getLogger(__name__)

T = TypeVar("T")

CACHE_ATTRIBUTE = "_lorafleet_compiled_layers"  # on the base model: one set of compiled layers per (shapes, backend)
# Graphs one layer's code may hold: shapes (an epoch's last micro-batch), gradient mode. torch's default is 8.
RECOMPILE_LIMIT = 32


def _require_grad(module: Any, inputs: Any, output: torch.Tensor) -> None:
    output.requires_grad_(True)


class CompiledLayers:
    """A model's decoder layers with a compiled twin each, swapped in by ``active()``."""

    def __init__(
        self,
        layers: list[torch.nn.Module],
        embeddings: torch.nn.Module,
        *,
        dynamic: bool,
        backend: str | Callable[..., Any],
    ):
        from torch import _dynamo

        config = _dynamo.config
        if hasattr(config, "recompile_limit"):
            config.recompile_limit = max(config.recompile_limit, RECOMPILE_LIMIT)
        self.layers = layers
        self.embeddings = embeddings
        self.dynamic = dynamic
        self.backend = backend
        # The module's own call path (hooks included), compiled: what ``nn.Module.compile`` installs.
        self.compiled = [torch.compile(layer._call_impl, backend=backend, dynamic=dynamic) for layer in layers]
        self.failure: str | None = None

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """Inside, the layers run their compiled code (unless compilation failed before)."""
        if self.failure is not None:
            yield
            return
        from torch import _dynamo

        hook = self.embeddings.register_forward_hook(_require_grad)
        for layer, compiled in zip(self.layers, self.compiled, strict=True):
            layer._compiled_call_impl = compiled
        # Dynamic shapes are for the tensors' sizes: Python floats (LoRA's and attention's scales) stay constants,
        # or dynamo traces them symbolically, specializes them anyway, and traces the layer a second time.
        floats: dict[str, Any] = {"specialize_float": True} if hasattr(_dynamo.config, "specialize_float") else {}
        try:
            with _dynamo.config.patch(floats):
                yield
        finally:
            for layer in self.layers:
                layer._compiled_call_impl = None
            hook.remove()

    def prepare(self, batch: dict[str, Any]) -> None:
        """Mark what varies between micro-batches of one compiled shape as dynamic: the rows' boundaries."""
        boundaries = batch.get("cu_seq_lens")
        if self.failure is None and isinstance(boundaries, torch.Tensor):
            from torch import _dynamo

            _dynamo.mark_dynamic(boundaries, 0)

    def give_up(self, error: BaseException) -> None:
        self.failure = f"{type(error).__name__}: {error}"[:500]
        log.warning("training.compile: the compiled decoder layers failed (%s); training goes on eagerly", self.failure)


def compiled_layers(
    model: Any, *, packed: bool, backend: str | Callable[..., Any] = "inductor"
) -> CompiledLayers | None:
    """``model``'s compiled decoder layers, made once per model, shape policy and backend; None (with a warning)
    for a model without a ``layers`` list in its decoder."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    cache: dict[tuple[bool, Any], CompiledLayers] = base.__dict__.setdefault(CACHE_ATTRIBUTE, {})
    key = (packed, backend)
    if key not in cache:
        layers = getattr(base.get_decoder(), "layers", None)
        if not isinstance(layers, torch.nn.ModuleList) or len(layers) == 0:
            log.warning("training.compile is ignored: %s has no list of decoder layers", type(base).__name__)
            return None
        cache[key] = CompiledLayers(list(layers), base.get_input_embeddings(), dynamic=not packed, backend=backend)
    return cache[key]


def _rng_state() -> tuple[torch.Tensor, torch.Tensor | None]:
    cuda = torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    return torch.get_rng_state(), cuda  # host-side copies: no device sync


def run_with_eager_fallback(layers: CompiledLayers | None, work: Callable[[], T], undo: Callable[[], None]) -> T:
    """``work()`` with the compiled layers active; if it fails there, ``undo()`` its effects and run it eagerly.

    An out-of-memory error is not a compilation problem: it propagates, as it would eagerly.
    """
    if layers is None or layers.failure is not None:
        return work()
    cpu_rng, cuda_rng = _rng_state()
    try:
        with layers.active():
            return work()
    except torch.OutOfMemoryError:
        raise
    except Exception as exc:  # dynamo, the backend or the generated code: whatever it is, eager must still train
        layers.give_up(exc)
    undo()
    torch.set_rng_state(cpu_rng)
    if cuda_rng is not None:
        torch.cuda.set_rng_state(cuda_rng)
    return work()
