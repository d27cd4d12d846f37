"""Domain errors of the inference service and the one table that maps them to gRPC status codes."""

from __future__ import annotations

import grpc

from lorafleet_common.adapters import AdapterNotFound
from lorafleet_common.names import InvalidName
from lorafleet_common.store import InvalidKey, StoreUnavailable


class InferenceError(Exception):
    """Base class of errors a caller should see with a specific status."""


class InvalidRequest(InferenceError):
    """The request is malformed: bad parameters, a prompt longer than the context, ..."""


class ContextLengthExceeded(InvalidRequest):
    """The prompt, or the prompt plus max_tokens, does not fit the model's context (OUT_OF_RANGE, so the
    gateway can answer OpenAI's context_length_exceeded)."""


class AdapterRejected(InferenceError):
    """The adapter exists but failed validation; ``problems`` lists every reason."""

    def __init__(self, ref: str, problems: list[str]) -> None:
        self.ref = ref
        self.problems = list(problems)
        super().__init__(f"adapter {ref} cannot be served: " + "; ".join(self.problems))


class CapacityExhausted(InferenceError):
    """No room: every adapter slot is pinned, or similar."""


class ServingModeConflict(InferenceError):
    """The replica's serving mode rules the call out: merged for another adapter, switching, not merge-capable,
    or its merge is younger than its minimum hold (see merge.py)."""


class ServiceUnavailable(InferenceError):
    """Try again later or elsewhere: the store is down, the engine is not ready, the replica is draining."""


# Order matters only between a class and its subclasses; lookups walk the exception's MRO.
_STATUS: dict[type[BaseException], grpc.StatusCode] = {
    InvalidRequest: grpc.StatusCode.INVALID_ARGUMENT,
    ContextLengthExceeded: grpc.StatusCode.OUT_OF_RANGE,
    InvalidName: grpc.StatusCode.INVALID_ARGUMENT,
    InvalidKey: grpc.StatusCode.INVALID_ARGUMENT,
    AdapterNotFound: grpc.StatusCode.NOT_FOUND,  # lorafleet_common.adapters: no such adapter or version
    AdapterRejected: grpc.StatusCode.FAILED_PRECONDITION,
    ServingModeConflict: grpc.StatusCode.FAILED_PRECONDITION,
    CapacityExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ServiceUnavailable: grpc.StatusCode.UNAVAILABLE,
    StoreUnavailable: grpc.StatusCode.UNAVAILABLE,
    TimeoutError: grpc.StatusCode.UNAVAILABLE,
}


def grpc_status(exc: BaseException) -> tuple[grpc.StatusCode, str] | None:
    """The status a caller should see for ``exc``, or None for an unexpected (internal) error."""
    for cls in type(exc).__mro__:
        code = _STATUS.get(cls)
        if code is not None:
            return code, str(exc) or cls.__name__
    return None


def status_label(exc: BaseException | None) -> str:
    """A short label for metrics: "ok", or the status name in lower case."""
    if exc is None:
        return "ok"
    mapped = grpc_status(exc)
    return mapped[0].name.lower() if mapped else "internal"
