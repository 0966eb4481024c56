"""Verifiable tasks: seeded prompt generators, answer parsers, and verifiers that return a reward.

Model output is never executed: Countdown expressions are parsed with `ast` and evaluated
by walking a whitelist of node types (integers, + - * /, parentheses).
"""
from __future__ import annotations

import ast
import random
import re
from dataclasses import dataclass
from fractions import Fraction

ANSWER = re.compile(r"=\s*(.+?)\s*(?:$|\n|<\|endoftext\|>)")
_OPS = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
        ast.Div: lambda a, b: a / b}
MAX_EXPRESSION_CHARS = 64


@dataclass(frozen=True)
class Problem:
    prompt: str
    target: int
    numbers: tuple[int, ...] = ()


def split_seed(seed: int, split: str) -> int:
    # Disjoint streams per split, so held-out prompts never come from the training generator.
    return seed * 1000 + {"train": 0, "validation": 1, "test": 2}[split]


class ArithmeticTask:
    """'a+b=' with multi-digit operands; the answer is the integer after '='."""

    name = "arithmetic"

    def __init__(self, digits: int = 3, ops: str = "+-"):
        self.digits, self.ops = digits, ops

    def problems(self, n: int, seed: int = 0, split: str = "train") -> list[Problem]:
        rng = random.Random(split_seed(seed, split))
        hi = 10 ** self.digits - 1
        out = []
        for _ in range(n):
            a, b, op = rng.randint(0, hi), rng.randint(0, hi), rng.choice(self.ops)
            out.append(Problem(f"{a}{op}{b}=", a + b if op == "+" else a - b, (a, b)))
        return out

    @staticmethod
    def parse(completion: str) -> int | None:
        m = re.match(r"\s*(-?\d{1,12})(?!\d)", completion)
        return int(m.group(1)) if m else None

    def reward(self, problem: Problem, completion: str) -> float:
        return 1.0 if self.parse(completion) == problem.target else 0.0


def evaluate_expression(text: str) -> Fraction:
    """Exact value of an arithmetic expression over integers; ValueError for anything else."""
    if len(text) > MAX_EXPRESSION_CHARS:
        raise ValueError("expression too long")
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except SyntaxError:
        raise ValueError("not an expression") from None

    def walk(node) -> Fraction:
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return Fraction(node.value)
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            left, right = walk(node.left), walk(node.right)
            if isinstance(node.op, ast.Div) and right == 0:
                raise ValueError("division by zero")
            return _OPS[type(node.op)](left, right)
        raise ValueError(f"{type(node).__name__} is not allowed")

    return walk(tree)


def numbers_used(text: str) -> list[int]:
    tree = ast.parse(text.strip(), mode="eval")
    return sorted(n.value for n in ast.walk(tree) if isinstance(n, ast.Constant))


class CountdownTask:
    """Reach a target from given numbers with + - * /, each number used at most once."""

    name = "countdown"

    def __init__(self, count: int = 3, max_number: int = 20):
        self.count, self.max_number = count, max_number

    def problems(self, n: int, seed: int = 0, split: str = "train") -> list[Problem]:
        rng = random.Random(split_seed(seed, split))
        out = []
        while len(out) < n:
            nums = [rng.randint(1, self.max_number) for _ in range(self.count)]
            # Build the target from a random expression so every problem has a solution.
            expr = str(nums[0])
            for x in nums[1:]:
                expr = f"({expr}{rng.choice('+-*')}{x})"
            target = evaluate_expression(expr)
            if target.denominator == 1 and 0 < target <= 999:
                out.append(Problem(f"{' '.join(map(str, nums))} -> {int(target)}:", int(target), tuple(nums)))
        return out

    @staticmethod
    def parse(completion: str) -> str | None:
        line = completion.strip().splitlines()[0] if completion.strip() else ""
        return line.split("<|endoftext|>")[0].strip() or None

    def reward(self, problem: Problem, completion: str) -> float:
        expr = self.parse(completion)
        if expr is None:
            return 0.0
        try:
            value = evaluate_expression(expr)
            used = numbers_used(expr)
        except (ValueError, RecursionError):
            return 0.0
        available = sorted(problem.numbers)
        for x in used:  # each given number at most once
            if x not in available:
                return 0.0
            available.remove(x)
        return 1.0 if value == problem.target else 0.0


TASKS = {"arithmetic": ArithmeticTask, "countdown": CountdownTask}
