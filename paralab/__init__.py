"""paralab: the library of the tensor- and pipeline-parallel training course."""

from .schedules import (Action, Schedule, ScheduleError, build, gpipe, interleaved_one_f_one_b,
                        one_f_one_b, validate, zb_h1)
from .simulator import DeadlockError, simulate
from .timeline import Event, Timeline

__all__ = [
    "Action", "Schedule", "ScheduleError", "DeadlockError", "Event", "Timeline",
    "build", "gpipe", "one_f_one_b", "interleaved_one_f_one_b", "zb_h1", "validate", "simulate",
]
