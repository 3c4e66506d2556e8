"""Dataset sources, mixes and the episodic task sampler."""

from metaseg.data.mix import Mix, build_mix
from metaseg.data.tasks import Task, TaskSampler

__all__ = ["Mix", "Task", "TaskSampler", "build_mix"]
