"""Ryzen RLVR plugin: tasks whose answers a program can check, and training that uses the checker."""
from .tasks import TASKS, ArithmeticTask, CountdownTask, Problem, evaluate_expression

__all__ = ["TASKS", "ArithmeticTask", "CountdownTask", "Problem", "evaluate_expression"]
