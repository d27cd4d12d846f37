"""Domain exceptions, and the one table that maps them to gRPC status codes."""

from __future__ import annotations

import grpc


class TrainerError(Exception):
    """Base class of the errors the trainer reports to callers."""


class JobNotFound(TrainerError):
    """No job with that id."""


class InvalidRequest(TrainerError):
    """A bad manifest, manifest URI, job id or argument."""


class JobAlreadyExists(TrainerError):
    """A job with that id exists."""


class StoreDown(TrainerError):
    """The job database or the object store cannot be reached."""


class NotAccepting(TrainerError):
    """The trainer is shutting down and admits no new jobs."""


GRPC_STATUS: dict[type[TrainerError], grpc.StatusCode] = {
    JobNotFound: grpc.StatusCode.NOT_FOUND,
    InvalidRequest: grpc.StatusCode.INVALID_ARGUMENT,
    JobAlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    StoreDown: grpc.StatusCode.UNAVAILABLE,
    NotAccepting: grpc.StatusCode.UNAVAILABLE,
}


def grpc_status(exc: TrainerError) -> grpc.StatusCode:
    for kind in type(exc).__mro__:
        if kind in GRPC_STATUS:
            return GRPC_STATUS[kind]
    return grpc.StatusCode.INTERNAL
