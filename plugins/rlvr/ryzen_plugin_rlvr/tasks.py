"""Verifiable tasks: seeded prompt generators, answer parsers, and verifiers that return a reward.

A task is a `Task` subclass. The built-in ones are `arithmetic` and `countdown`; third parties add
theirs through the entry-point group `ryzen_rlvr.tasks` (see the README), or name one where it lives,
`module:Class`, without packaging it.

Model output is never executed: Countdown expressions are parsed with `ast` and evaluated by
walking a whitelist of node types (integer literals, + - * /, parentheses), with exact fractions.
"""
from __future__ import annotations

import ast
import random
import re
import warnings
from abc import ABC, abstractmethod
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Callable, Hashable

TASK_ENTRY_POINT_GROUP = "ryzen_rlvr.tasks"
MAX_EXPRESSION_CHARS = 64
# Longer than any chain `ArithmeticTask.parse` accepts (16 steps of 18-digit numbers): longer is malformed,
# and no regex runs over it (finding steps in a long digit string is quadratic in its length).
MAX_CHAIN_CHARS = 1024
# Countdown reads plain decimal integers only: no 0x2d, 1_5, 1e3 or 1.5 (Python's literal syntax is wider).
PLAIN_EXPRESSION = re.compile(r"[0-9+\-*/()\s]*")
LEADING_ZEROS = re.compile(r"(?<![0-9])0+(?=[0-9])")
SPLITS = ("train", "validation", "test")
_OPS = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
        ast.Div: lambda a, b: a / b}


@dataclass(frozen=True)
class Problem:
    prompt: str
    target: Any
    """What a right answer must equal (the parsed form)."""
    solution: str = ""
    """A reference completion, used as supervised warm-up data."""
    numbers: tuple[int, ...] = ()


def split_seed(seed: int, split: str) -> int:
    # Disjoint streams per split, so held-out prompts never come from the training generator.
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return seed * 1000 + SPLITS.index(split)


def completion_text(completion: str) -> str:
    """The part of a completion the parser looks at: up to the first end-of-text or newline."""
    return completion.split("<|endoftext|>")[0].split("\n")[0]


class Task(ABC):
    """A family of problems with a program that checks answers."""

    name: str = ""
    verifiable_at_inference: bool = False
    """True when `reward` needs only what the prompt shows, so best-of-N may use it while answering.
    False when checking needs the reference answer (it would be solving the problem)."""
    max_new_tokens: int = 16
    """Enough tokens for any right answer plus end-of-text, one character per token."""
    max_reward: float = 1.0

    @abstractmethod
    def problems(self, n: int, seed: int = 0, split: str = "train") -> list[Problem]:
        """`n` problems, the same for the same (seed, split); splits never share a generator."""

    @abstractmethod
    def parse(self, completion: str) -> Hashable | None:
        """The answer in a completion, or None when it is malformed."""

    @abstractmethod
    def reward(self, problem: Problem, completion: str) -> float:
        """0 .. max_reward; max_reward only for a right answer."""

    def vote_key(self, answer: Hashable) -> Hashable:
        """What majority voting counts; answers with the same key are the same answer."""
        return answer

    def problem_from_prompt(self, prompt: str) -> Problem | None:
        """The problem a prompt shows, for tasks verifiable at inference (best-of-N on raw prompts)."""
        return None


class ArithmeticTask(Task):
    """Sums and differences of multi-digit numbers: '42+17+05=' with zero-padded operands (every prompt
    has the same length).

    `chain=False`: the completion is the answer ('64'). `chain=True`: the completion adds the terms one
    at a time, in an order of the solver's choosing, and the last result is the answer
    ('17+05=22,22+42=64'). Different orders are different reasoning paths to the same answer, which is
    what majority voting over sampled paths needs: wrong paths scatter over many answers, right ones
    agree. The supervised data shows every order with equal probability.
    """

    name = "arithmetic"

    def __init__(self, digits: int = 2, terms: int = 3, ops: str = "+", chain: bool = True):
        if not 1 <= digits <= 9:
            raise ValueError(f"digits must be in 1..9, got {digits}")
        if not 2 <= terms <= 8:
            raise ValueError(f"terms must be in 2..8, got {terms}")
        if not ops or set(ops) - set("+-*"):
            raise ValueError(f"ops must be a non-empty string of + - *, got {ops!r}")
        if "*" in ops and (terms > 2 or chain):
            raise ValueError("'*' is supported for two terms without a chain (the order of a chain would change its value)")
        self.digits, self.terms, self.ops, self.chain = digits, terms, ops, chain
        value_chars = 1 + (digits + len(str(terms)) if "*" not in ops else 2 * digits)  # sign and digits
        step = 2 * value_chars + digits + 3  # 'acc+x=new,'
        self.max_new_tokens = (terms - 1) * step + 1 if chain else value_chars + 1  # + end-of-text

    def problems(self, n: int, seed: int = 0, split: str = "train") -> list[Problem]:
        rng = random.Random(split_seed(seed, split))
        hi = 10 ** self.digits - 1
        out = []
        for _ in range(n):
            values = [rng.randint(0, hi) for _ in range(self.terms)]
            ops = [rng.choice(self.ops) for _ in range(self.terms - 1)]
            prompt = f"{values[0]:0{self.digits}d}" + "".join(f"{op}{v:0{self.digits}d}" for op, v in zip(ops, values[1:]))
            if ops == ["*"]:
                target = values[0] * values[1]
            else:
                target = values[0] + sum(v if op == "+" else -v for op, v in zip(ops, values[1:]))
            solution = self._chain(values, ["+", *ops], rng) if self.chain else str(target)
            out.append(Problem(prompt + "=", target, solution, tuple(values)))
        return out

    @staticmethod
    def _chain(values: list[int], signs: list[str], rng: random.Random) -> str:
        order = list(range(len(values)))
        rng.shuffle(order)
        first = order[0]
        acc = values[first] if signs[first] == "+" else -values[first]
        steps = []
        for i in order[1:]:
            new = acc + values[i] if signs[i] == "+" else acc - values[i]
            steps.append(f"{acc}{signs[i]}{values[i]}={new}")
            acc = new
        return ",".join(steps)

    def parse(self, completion: str) -> int | None:
        text = completion_text(completion).strip()
        if len(text) > MAX_CHAIN_CHARS:
            return None
        if self.chain:
            m = re.fullmatch(r"(?:-?[0-9]{1,18}[+-][0-9]{1,18}=-?[0-9]{1,18},){0,15}-?[0-9]{1,18}[+-][0-9]{1,18}=(-?[0-9]{1,18})", text)
        else:
            m = re.fullmatch(r"(-?[0-9]{1,18})", text)
        return int(m.group(1)) if m else None

    def reward(self, problem: Problem, completion: str) -> float:
        return 1.0 if self.parse(completion) == problem.target else 0.0

    def diagnose(self, problem: Problem, completion: str) -> str:
        """Why a chain is wrong: 'right', 'malformed', 'operand' (a term missing or miscopied from the
        prompt) or 'arithmetic' (the terms are right, a sum or a carried result is not)."""
        answer = self.parse(completion)
        if answer == problem.target:
            return "right"
        if answer is None:  # before any search, which only ever sees a chain of bounded length
            return "malformed"
        steps = re.findall(r"(-?[0-9]+)([+-])([0-9]+)=(-?[0-9]+)", completion_text(completion))
        if not self.chain or not steps:
            return "arithmetic"
        used = [abs(int(steps[0][0]))] + [int(b) for _, _, b, _ in steps]
        if sorted(used) != sorted(problem.numbers):
            return "operand"
        return "arithmetic"


def plain_decimal(text: str) -> str:
    """`text` if it holds only decimal integers, + - * /, parentheses and spaces, else ValueError.
    Zero-padded operands copied from the prompt ('15*03') count as the numbers they show (15*3)."""
    if not PLAIN_EXPRESSION.fullmatch(text):
        raise ValueError("only decimal integers, + - * / and parentheses are allowed")
    return LEADING_ZEROS.sub("", text)


def evaluate_expression(text: str) -> Fraction:
    """Exact value of an arithmetic expression over integer literals; ValueError for anything else."""
    if len(text) > MAX_EXPRESSION_CHARS:
        raise ValueError("expression too long")
    text = plain_decimal(text)
    try:
        with warnings.catch_warnings():  # model output like '5if9' makes the parser warn; it is rejected anyway
            warnings.simplefilter("ignore", SyntaxWarning)
            tree = ast.parse(text.strip(), mode="eval")
    except (SyntaxError, ValueError, MemoryError, RecursionError):
        raise ValueError("not an expression") from None

    def walk(node) -> Fraction:
        if isinstance(node, ast.Expression):
            return walk(node.body)
        # `type(...) is int` rather than isinstance: True/False are ints to isinstance.
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
    """Integer literals of an expression that `evaluate_expression` accepted."""
    tree = ast.parse(plain_decimal(text).strip(), mode="eval")
    return sorted(n.value for n in ast.walk(tree) if isinstance(n, ast.Constant))


class CountdownTask(Task):
    """Reach a target from given numbers with + - * / and parentheses, each number used at most once.

    Prompt '03 15 07->045:' (zero-padded, so every prompt has the same length); the completion is an
    expression such as '15*3'. Checking is easy, finding an expression is a search.
    """

    name = "countdown"
    verifiable_at_inference = True  # numbers and target are in the prompt

    def __init__(self, count: int = 3, max_number: int = 20, max_target: int = 999):
        if count < 2:
            raise ValueError(f"count must be at least 2, got {count}")
        self.count, self.max_number, self.max_target = count, max_number, max_target
        self.width, self.target_width = len(str(max_number)), len(str(max_target))
        self.max_new_tokens = min(MAX_EXPRESSION_CHARS, count * (self.width + 3) + 1)

    def problems(self, n: int, seed: int = 0, split: str = "train") -> list[Problem]:
        rng = random.Random(split_seed(seed, split))
        out = []
        while len(out) < n:
            nums = [rng.randint(1, self.max_number) for _ in range(self.count)]
            # The target comes from a random expression over the numbers, so every problem has a solution.
            expr = str(nums[0])
            for x in nums[1:]:
                op = rng.choice("+-*")
                expr = f"({expr}){op}{x}" if op == "*" and any(c in expr for c in "+-") else f"{expr}{op}{x}"
            target = evaluate_expression(expr)
            if target.denominator == 1 and 0 < target <= self.max_target:
                shown = " ".join(f"{x:0{self.width}d}" for x in nums)
                out.append(Problem(f"{shown}->{int(target):0{self.target_width}d}:", int(target), expr, tuple(nums)))
        return out

    def parse(self, completion: str) -> str | None:
        return "".join(completion_text(completion).split()) or None

    def problem_from_prompt(self, prompt: str) -> Problem | None:
        m = re.fullmatch(r"\s*((?:[0-9]+ )*[0-9]+)->([0-9]+):\s*", prompt)
        if m is None:
            return None
        numbers = tuple(int(x) for x in m.group(1).split())
        return Problem(prompt.strip(), int(m.group(2)), "", numbers)

    def reward(self, problem: Problem, completion: str) -> float:
        expr = self.parse(completion)
        if expr is None:
            return 0.0
        try:
            value = evaluate_expression(expr)
            used = numbers_used(expr)
        except (ValueError, RecursionError, MemoryError):
            return 0.0
        available = sorted(problem.numbers)
        for x in used:  # each given number at most once
            if x not in available:
                return 0.0
            available.remove(x)
        return 1.0 if value == problem.target else 0.0


TaskFactory = Callable[..., Task]
BUILTIN_TASKS: dict[str, TaskFactory] = {"arithmetic": ArithmeticTask, "countdown": CountdownTask}


def available_tasks() -> dict[str, TaskFactory]:
    """Built-in tasks, then tasks of installed packages (entry points)."""
    from importlib.metadata import entry_points

    tasks: dict[str, TaskFactory] = dict(BUILTIN_TASKS)
    for ep in entry_points(group=TASK_ENTRY_POINT_GROUP):
        # Imported only when built, so one broken package cannot break the other tasks.
        tasks.setdefault(ep.name, lambda _ep=ep, **options: _ep.load()(**options))
    return tasks


def is_task_path(name: str) -> bool:
    """`module:Class`: a task named by where it lives rather than registered. Unlike a registry kept in
    one process, the name also works in the worker processes that validation starts."""
    module, _, attr = name.partition(":")
    return bool(module) and attr.isidentifier()


def _imported_task(name: str) -> TaskFactory:
    from importlib import import_module

    module, _, attr = name.partition(":")
    try:
        return getattr(import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"task {name!r} cannot be imported ({exc})") from None


def get_task(name: str, **options: Any) -> Task:
    """The task `name` (built-in, from an installed package, or `module:Class`) built with `options`."""
    tasks = available_tasks()
    if name in tasks:
        factory = tasks[name]
    elif is_task_path(name):
        factory = _imported_task(name)
    else:
        raise ValueError(f"unknown task {name!r} (available: {', '.join(sorted(tasks))}; or module:Class)")
    task = factory(**options)
    if not isinstance(task, Task):
        raise TypeError(f"task {name!r} built a {type(task).__name__}, not a ryzen_plugin_rlvr.Task")
    return task
