"""The two exceptions :func:`paralab.launch.run` raises when a world fails.

Both carry what a student needs to fix the problem without reading the others' noise: the
rank to blame, every rank's traceback and captured output.  How the culprit is chosen is
:mod:`paralab.launch.diagnosis`'s business.
"""

from __future__ import annotations


class WorkerError(RuntimeError):
    """A rank of a :func:`run` world failed.

    ``rank`` is the rank that failed first (ranks that only failed because a peer vanished
    or timed out are passed over); ``tracebacks`` maps every rank that raised to its
    traceback text, ``outputs`` every rank to its captured stdout+stderr.
    """

    __module__ = "paralab.launch"  # where users import it from, and how tracebacks name it

    def __init__(self, message: str, rank: int, tracebacks: dict[int, str],
                 outputs: dict[int, str]):
        super().__init__(message)
        self.rank = rank
        self.tracebacks = tracebacks
        self.outputs = outputs


class WorkerTimeout(WorkerError):
    """Ranks of a :func:`run` world were still running when it had to stop them.

    ``ranks`` lists them; ``rank`` is the most likely culprit (a running rank that is not
    waiting inside torch.distributed, else the lowest); ``stacks`` maps each of them to the
    Python stacks it reported just before it was killed.
    """

    __module__ = "paralab.launch"

    def __init__(self, message: str, rank: int, ranks: list[int], stacks: dict[int, str],
                 tracebacks: dict[int, str], outputs: dict[int, str]):
        super().__init__(message, rank, tracebacks, outputs)
        self.ranks = ranks
        self.stacks = stacks
