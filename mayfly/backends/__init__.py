"""Container backends: where runner processes live."""

from mayfly.backends.base import (
    BackendError,
    ContainerBackend,
    ContainerRecord,
    ContainerState,
    NameTakenByAnother,
)

__all__ = ["BackendError", "ContainerBackend", "ContainerRecord", "ContainerState", "NameTakenByAnother"]
