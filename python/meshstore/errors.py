"""The errors meshstore raises. Each names the entity (``entity_id``) and, where it is
about components, the keys (``keys``); the gRPC server maps each class to a status code."""


class MeshstoreError(Exception):
    """Base class of every meshstore error."""

    entity_id: str | None = None
    keys: list[str] = []


class InvalidEntityError(MeshstoreError, ValueError):
    """Bad input: malformed bytes, empty id, oversize entity, unparsable component."""


class NotFoundError(MeshstoreError, KeyError):
    """No live entity with that id."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else "not found"


class AlreadyExistsError(MeshstoreError):
    """``create`` of an id that is live."""


class StaleWriteError(MeshstoreError):
    """A ``strict`` update with stale keys: nothing was applied."""


class ClockSkewError(MeshstoreError):
    """A version stamped further ahead of the local clock than ``max_clock_offset``."""


class CursorExpiredError(MeshstoreError):
    """A ``since_seq`` cursor older than a collected tombstone: take a fresh snapshot."""


class FailedPreconditionError(MeshstoreError):
    """The request does not apply to the entity's state (e.g. no pending approval)."""


class NoPendingApprovalError(FailedPreconditionError):
    """``approve`` / ``deny`` of an entity whose approval is not PENDING (or that has
    none, or whose ``approval`` component is not an ApprovalComponent)."""


class StorageError(MeshstoreError):
    """The data dir cannot be opened, read or written (the message says which and why):
    a foreign, newer or corrupt file, a dir in use by another process, a full or
    read-only disk. A write refused with it was not applied."""
