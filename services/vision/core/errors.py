"""Domain errors, each carrying the gRPC status it maps to.

Lower layers (image I/O, models, backends) raise these without importing gRPC; the one place that turns
them into gRPC statuses is `vision.api.rpc`. Messages are written for the caller: what was wrong and what to
send instead.
"""

from __future__ import annotations


class VisionError(Exception):
    """Base class: `status` is the name of a `grpc.StatusCode` member."""

    status: str = "INTERNAL"


class InvalidArgument(VisionError):
    """The request is malformed: bad image, bad parameter. Retrying the same request will fail again."""

    status = "INVALID_ARGUMENT"


class InvalidImage(InvalidArgument):
    """An image could not be used; `reason` is caller-facing, `index` is set once the batch position is known."""

    def __init__(self, reason: str, index: int | None = None) -> None:
        self.reason = reason
        self.index = index
        super().__init__(self._render())

    def _render(self) -> str:
        return f"image {self.index}: {self.reason}" if self.index is not None else self.reason

    def at(self, index: int, image_id: str = "") -> "InvalidImage":
        """Same error, naming the image's position (and id) in the request."""
        err = InvalidImage(self.reason, index)
        if image_id:
            err.args = (f"image {index} (id {image_id!r}): {self.reason}",)
        return err


class NotFound(VisionError):
    """Unknown model, version, job."""

    status = "NOT_FOUND"


class ResourceExhausted(VisionError):
    """Too much at once: batch over the limit, queue full."""

    status = "RESOURCE_EXHAUSTED"


class Unavailable(VisionError):
    """A backend is down or unreachable; the caller may retry with backoff."""

    status = "UNAVAILABLE"


class FailedPrecondition(VisionError):
    """The system is not in a state to serve this yet (model not loaded)."""

    status = "FAILED_PRECONDITION"


class Unimplemented(VisionError):
    """This installation cannot do it (a library the slim image leaves out); another one can."""

    status = "UNIMPLEMENTED"


class DeadlineExceeded(VisionError):
    status = "DEADLINE_EXCEEDED"


class ConfigurationError(VisionError):
    """Bad start-up configuration (weights file, label file, flags). Raised before serving starts."""
