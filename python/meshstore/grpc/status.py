"""meshstore's exceptions <-> gRPC status codes, both directions.

Server side: :func:`status_for` is the status code and details an exception stands for
(nothing escapes as UNKNOWN): the HTTP side answers with it. The gRPC server itself maps
the core's errors in Rust (rust/server/rpc.rs, the same table).

Client side: :func:`error_from_rpc` is the meshstore error a failed call stands for
(the inverse mapping), plus the errors only a remote store has:
:class:`StoreUnavailableError` (unreachable or no answer in time: retry later),
:class:`FailedPreconditionError` (defined in ``meshstore.errors``, re-exported here)
and :class:`RpcError` (any other code).

    ================================  ==================
    exception                         status code
    ================================  ==================
    StaleWriteError                   ABORTED
    NotFoundError                     NOT_FOUND
    AlreadyExistsError                ALREADY_EXISTS
    ClockSkewError                    OUT_OF_RANGE
    CursorExpiredError                OUT_OF_RANGE
    FailedPreconditionError,          FAILED_PRECONDITION
    NoPendingApprovalError
    InvalidEntityError, ValueError,   INVALID_ARGUMENT
    TypeError
    StorageError                      UNAVAILABLE (a full or failing disk)
    anything else (a bug)             INTERNAL
    ================================  ==================
"""

from __future__ import annotations

import grpc

from meshstore.errors import (
    AlreadyExistsError,
    ClockSkewError,
    CursorExpiredError,
    FailedPreconditionError,
    InvalidEntityError,
    MeshstoreError,
    NotFoundError,
    StaleWriteError,
    StorageError,
)

__all__ = [
    "FailedPreconditionError",
    "RpcError",
    "StoreUnavailableError",
    "error_for",
    "error_from_rpc",
    "status_for",
]

_C = grpc.StatusCode


# ---- server side: exception -> status ------------------------------------------------------


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and details an exception is answered with."""
    message = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, StaleWriteError):
        return _C.ABORTED, message
    if isinstance(exc, NotFoundError):
        return _C.NOT_FOUND, message
    if isinstance(exc, AlreadyExistsError):
        return _C.ALREADY_EXISTS, message
    if isinstance(exc, (ClockSkewError, CursorExpiredError)):
        return _C.OUT_OF_RANGE, message
    if isinstance(exc, FailedPreconditionError):  # e.g. NoPendingApprovalError
        return _C.FAILED_PRECONDITION, message
    if isinstance(exc, (InvalidEntityError, ValueError, TypeError)):
        return _C.INVALID_ARGUMENT, message
    if isinstance(exc, StorageError):  # a full or failing disk: retry later, elsewhere
        return _C.UNAVAILABLE, message
    # A bug (ours or the core's, e.g. a Rust panic): say so without the internals.
    return _C.INTERNAL, f"internal error ({type(exc).__name__}); see the server log"


# ---- client side: status -> exception ------------------------------------------------------


class StoreUnavailableError(MeshstoreError, ConnectionError):
    """The store could not be reached (or did not answer in time): retry later."""


class RpcError(MeshstoreError):
    """Any other gRPC failure; ``code`` is the grpc.StatusCode."""

    def __init__(self, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.code = code


def error_from_rpc(err: grpc.RpcError, what: str = "request", address: str = "") -> MeshstoreError:
    """The meshstore error a failed call stands for (the inverse of ``status_for``)."""
    code = err.code() if callable(getattr(err, "code", None)) else None
    details = (err.details() if callable(getattr(err, "details", None)) else "") or ""
    return error_for(code, details, what, address)


#: Status codes by their number (google.rpc.Code), as messages carry them.
_CODES = {c.value[0]: c for c in grpc.StatusCode}


def error_for(code: grpc.StatusCode | int | None, details: str, what: str = "request",
              address: str = "") -> MeshstoreError:
    """The meshstore error of a status ``code`` (or its number) with ``details``."""
    if isinstance(code, int):
        code = _CODES.get(code)
    details = " ".join(details.split())
    if code in (_C.UNAVAILABLE, _C.DEADLINE_EXCEEDED):
        where = f" at {address}" if address else ""
        return StoreUnavailableError(f"{what}: store{where} unavailable ({code.name.lower()}: {details or 'no details'})")
    if code == _C.NOT_FOUND:
        return NotFoundError(details or f"{what}: not found")
    if code == _C.ALREADY_EXISTS:
        return AlreadyExistsError(details or f"{what}: already exists")
    if code == _C.INVALID_ARGUMENT:
        return InvalidEntityError(details or f"{what}: invalid argument")
    if code == _C.ABORTED:
        return StaleWriteError(details or f"{what}: stale write")
    if code == _C.FAILED_PRECONDITION:
        return FailedPreconditionError(details or f"{what}: failed precondition")
    if code == _C.OUT_OF_RANGE:
        if "cursor" in details or "since_seq" in details or "tombstone" in details:
            return CursorExpiredError(details)
        return ClockSkewError(details or f"{what}: out of range")
    name = code.name if code is not None else "UNKNOWN"
    return RpcError(f"{what} failed ({name}): {details or 'no details'}", code)
