"""The DistloadError family: every user-facing failure names what it is about."""

from __future__ import annotations


class DistloadError(Exception):
    """A failure a user can act on; names the file, tensor and rank where known.

    Args:
        message: what went wrong and, where possible, what to change.
        file: the checkpoint file involved.
        tensor: the checkpoint tensor name involved.
        rank: the global rank that saw the failure (filled in by ``load`` when unset).
    """

    def __init__(self, message: str, *, file: str | None = None, tensor: str | None = None,
                 rank: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.file = file
        self.tensor = tensor
        self.rank = rank

    def with_rank(self, rank: int) -> "DistloadError":
        """Returns self with ``rank`` set unless a rank is already named."""
        if self.rank is None:
            self.rank = rank
        return self

    def __str__(self) -> str:
        where = [f"{key} {value}" for key, value in
                 (("file", self.file), ("tensor", self.tensor), ("rank", self.rank)) if value is not None]
        return f"{self.message} [{', '.join(where)}]" if where else self.message

    def __reduce__(self):  # keep the named fields across process boundaries; the state goes last, so that
        # an error reachable from its own attributes (distload.ray's ``outcomes``) pickles too
        return (_rebuild, (type(self), self.message), self.__dict__)


def _rebuild(cls, message):
    err = cls.__new__(cls)
    Exception.__init__(err, message)
    return err


class CheckpointError(DistloadError):
    """The checkpoint directory or one of its files is unusable."""


class LayoutError(DistloadError):
    """The parallel layout is invalid, or does not fit the model."""


class ConfigError(DistloadError):
    """An option, extra-config key or model config value is invalid."""


class PlanError(DistloadError):
    """The model and the checkpoint disagree (shapes, sizes, coverage)."""


class PeerFailedError(DistloadError):
    """Another rank failed (or fell silent); raised on the ranks that did not fail.

    ``file`` and ``tensor`` are the failed rank's; ``failed_rank`` names it. ``lost_ranks``
    are the ranks that cannot report (fell silent, or hosted the lost store): the lowest
    rank not among them is the one to print the job's error.
    """

    def __init__(self, message: str, *, file: str | None = None, tensor: str | None = None,
                 rank: int | None = None, failed_rank: int | None = None,
                 lost_ranks: tuple[int, ...] = ()) -> None:
        super().__init__(message, file=file, tensor=tensor, rank=rank)
        self.failed_rank = failed_rank
        self.lost_ranks = tuple(lost_ranks)


class MissingWeightsError(DistloadError):
    """Some unit was owned but not loaded by every owner; ``report`` says which."""

    def __init__(self, message: str, *, report, rank: int | None = None) -> None:
        super().__init__(message, rank=rank)
        self.report = report
