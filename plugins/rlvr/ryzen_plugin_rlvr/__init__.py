"""Ryzen RLVR plugin: tasks whose answers a program can check, multi-path inference, and training
that uses the checker as the reward.

The task API is imported eagerly; everything that needs torch loads on first use, because the
`ryzen` command imports this package at start-up.
"""
from importlib import import_module

from .tasks import ArithmeticTask, CountdownTask, Problem, Task, available_tasks, evaluate_expression, get_task

_LAZY = {"SolveConfig": "multipath", "Solution": "multipath", "solve": "multipath", "TaskCodec": "sampling",
         "generate_paths": "sampling", "best_of_n": "selection", "majority_vote": "selection",
         "vote_decided": "selection"}

__all__ = ["ArithmeticTask", "CountdownTask", "Problem", "Task", "available_tasks", "evaluate_expression", "get_task",
           *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'ryzen_plugin_rlvr' has no attribute {name!r}")
