"""Held-out evaluation: accuracy as a function of N, the cost of each N, and paths/s batched vs one at a time.

Every figure is measured, never derived: each N is its own timed run of `solve`. Because path k of a
problem has the same seed whatever N is, the N=2 paths are the first two of the N=16 paths, so the
curve compares like with like (more paths, nothing else changed).

`evaluate_model` puts it together for a trained model: rlvr_report.{json,md} and rlvr_accuracy_vs_n.png.
"""
from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ryzen_core import format_ratio, markdown_table, paired_ratios, progress, write_json

from .multipath import SolveConfig, solve
from .sampling import TaskCodec, generate_paths, path_seed
from .tasks import Problem, Task, get_task

log = logging.getLogger(__name__)

Z95 = 1.959963984540054
# Two-sided 95% Student-t quantiles t(0.975, df) for df = 1..20 (no scipy in the core's dependencies).
T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
        2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086]


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """95% Wilson score interval of a binomial proportion (sound at 0 and 1, unlike the normal one)."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, min(p, centre - half)), min(1.0, max(p, centre + half))  # rounding must not exclude p


def t_interval(values: Sequence[float]) -> dict[str, Any]:
    """Mean and two-sided 95% Student-t interval of independent measurements (e.g. one per seed)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return {"n": n, "mean": mean, "std": None, "low": None, "high": None}
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    quantile = T975[n - 2] if n - 1 <= len(T975) else Z95 + 2.5 / (n - 1)  # the tail of the table, to 0.01
    half = quantile * std / math.sqrt(n)
    return {"n": n, "mean": mean, "std": std, "low": mean - half, "high": mean + half}


def score(task: Task, problems: Sequence[Problem], solutions) -> dict[str, Any]:
    right = sum(task.reward(p, s.completion) >= task.max_reward for p, s in zip(problems, solutions))
    any_right = sum(any(task.reward(p, c) >= task.max_reward for c in s.completions)
                    for p, s in zip(problems, solutions))
    lo, hi = wilson_interval(right, len(problems))
    return {"correct": right, "accuracy": right / len(problems), "ci95": [lo, hi],
            "pass_at_n": any_right / len(problems)}


def timed_solve(model, codec, task, problems, config: SolveConfig) -> tuple[list, float]:
    start = time.perf_counter()
    solutions = solve(model, codec, task, problems, config)
    return solutions, time.perf_counter() - start


def accuracy_vs_n(model: torch.nn.Module, codec: TaskCodec, task: Task, problems: Sequence[Problem],
                  ns: Sequence[int] = (1, 2, 4, 8, 16), temperature: float = 0.4, top_p: float = 1.0,
                  selection: str = "majority", seed: int = 0, adaptive_n: int | None = 8,
                  round_size: int = 4, max_new_tokens: int | None = None) -> list[dict[str, Any]]:
    """One row per decoding: greedy, then N sampled paths for each N (and adaptive N) with `selection`."""
    common = dict(seed=seed, max_new_tokens=max_new_tokens)
    sampled = dict(common, temperature=temperature, top_p=top_p, selection=selection)
    runs = [("greedy", SolveConfig(paths=1, temperature=0.0, **common))]
    runs += [(f"N={n}", SolveConfig(paths=n, **sampled)) for n in ns]
    if adaptive_n:
        runs.append((f"N={adaptive_n} adaptive", SolveConfig(paths=adaptive_n, adaptive=True, round_size=round_size,
                                                            **sampled)))
    rows = []
    for label, config in progress(runs, f"rlvr eval on {len(problems)} problems", unit="decoding"):
        solutions, wall = timed_solve(model, codec, task, problems, config)
        tokens = sum(s.generated_tokens for s in solutions)
        rows.append({"decoding": label, "n": config.paths if config.temperature > 0 else 1,
                     "selection": config.selection if config.temperature > 0 else "greedy",
                     **score(task, problems, solutions),
                     "paths_per_prompt": sum(s.paths_used for s in solutions) / len(problems),
                     "generated_tokens": tokens, "tokens_per_prompt": tokens / len(problems), "wall_s": wall})
    return rows


def paths_throughput(model: torch.nn.Module, codec: TaskCodec, task: Task, problems: Sequence[Problem], n: int = 8,
                     temperature: float = 0.4, top_p: float = 1.0, warmup: int = 1, repeats: int = 5,
                     seed: int = 0) -> dict[str, Any]:
    """Paths/s generating N paths per prompt as one batch (B) vs one path at a time (A), interleaved A B A B.

    Both sides generate the very same paths (per-path seeds, end-of-text on); `identical` checks it.
    """
    prompts = [codec.prompt_ids(p.prompt) for p in problems]
    seeds = [[path_seed(seed, i, k) for k in range(n)] for i in range(len(prompts))]
    max_new = task.max_new_tokens
    eos = codec.eos_id
    outputs: dict[str, list] = {"one": [], "batched": []}

    def one_by_one() -> float:
        start = time.perf_counter()
        got = []
        for prompt, row in zip(prompts, seeds):
            for s in row:
                p = generate_paths(model, [prompt], 1, max_new, eos_id=eos, temperature=temperature, top_p=top_p,
                                   seeds=[[s]])
                got.append(p.tokens[0, : int(p.lengths[0])].tolist())
        elapsed = time.perf_counter() - start
        outputs["one"] = got
        return len(prompts) * n / elapsed

    def batched() -> float:
        start = time.perf_counter()
        got = []
        for prompt, row in zip(prompts, seeds):
            p = generate_paths(model, [prompt], n, max_new, eos_id=eos, temperature=temperature, top_p=top_p,
                               seeds=[row])
            got += [p.tokens[k, : int(p.lengths[k])].tolist() for k in range(n)]
        elapsed = time.perf_counter() - start
        outputs["batched"] = got
        return len(prompts) * n / elapsed

    comparison = paired_ratios(one_by_one, batched, warmup=warmup, repeats=repeats, higher_is_better=True)
    return {"paths": n, "prompts": len(prompts), "temperature": temperature, "top_p": top_p,
            "one_by_one_paths_per_s": sorted(comparison.values_a)[len(comparison.values_a) // 2],
            "batched_paths_per_s": sorted(comparison.values_b)[len(comparison.values_b) // 2],
            "identical_paths": outputs["one"] == outputs["batched"], **comparison.to_dict()}


def vote_diagnostics(task: Task, problems: Sequence[Problem], solutions) -> dict[str, Any]:
    """Where majority voting loses: problems whose right answer was among the paths but lost the vote,
    the votes of the winner and of the right answer there, and (tasks with `diagnose`) why paths failed."""
    outvoted = [(p, s) for p, s in zip(problems, solutions)
                if s.answer != p.target and p.target in s.answers]
    kinds: dict[str, int] = {}
    diagnose = getattr(task, "diagnose", None)
    if diagnose is not None:
        for p, s in zip(problems, solutions):
            for c in s.completions:
                kind = diagnose(p, c)
                kinds[kind] = kinds.get(kind, 0) + 1
    n = max(len(outvoted), 1)
    return {"problems": len(problems), "outvoted": len(outvoted),
            "winner_votes_when_outvoted": sum(s.answers.count(s.answer) for _, s in outvoted) / n,
            "right_votes_when_outvoted": sum(s.answers.count(p.target) for p, s in outvoted) / n,
            "path_outcomes": kinds}


def greedy_accuracy(model: torch.nn.Module, codec: TaskCodec, task: Task, problems: Sequence[Problem]) -> dict:
    solutions = solve(model, codec, task, problems, SolveConfig(paths=1, temperature=0.0))
    return score(task, problems, solutions)



def evaluate_model(model: torch.nn.Module, tokenizer: Any, settings: Any, out_dir: Path, *,
                   warmup_model: torch.nn.Module | None = None, compute: dict | None = None,
                   record: Callable[..., None] | None = None, throughput: bool = True) -> dict[str, Any]:
    """Accuracy vs N on held-out problems (and the warm-up model's greedy accuracy, and paths/s);
    writes rlvr_report.json, rlvr_report.md and rlvr_accuracy_vs_n.png into out_dir."""
    task = get_task(settings.task, **settings.task_options)
    codec = TaskCodec(tokenizer)
    problems = task.problems(settings.eval_problems, seed=settings.eval_seed, split="test")
    rows = accuracy_vs_n(model, codec, task, problems, settings.eval_paths, settings.temperature, settings.top_p,
                         settings.selection, seed=settings.eval_seed,
                         adaptive_n=settings.paths if settings.adaptive else None, round_size=settings.round_size,
                         max_new_tokens=settings.max_new_tokens)
    report: dict[str, Any] = {"task": task.name, "task_options": settings.task_options, "split": "test",
                              "problems": len(problems), "eval_seed": settings.eval_seed,
                              "verifiable_at_inference": task.verifiable_at_inference,
                              "temperature": settings.temperature, "top_p": settings.top_p,
                              "accuracy_vs_n": rows}
    if warmup_model is not None:
        before, after = greedy_accuracy(warmup_model, codec, task, problems), next(r for r in rows if r["decoding"] == "greedy")
        report["warmup_vs_final"] = {"warmup": before, "final": {k: after[k] for k in ("correct", "accuracy", "ci95")},
                                     "delta_points": 100 * (after["accuracy"] - before["accuracy"])}
    if throughput:
        log.info("rlvr eval: paths/s, batched vs one at a time (%d interleaved rounds)", settings.throughput_repeats)
        report["throughput"] = paths_throughput(model, codec, task, problems[: settings.throughput_prompts],
                                                n=settings.paths, temperature=settings.temperature,
                                                top_p=settings.top_p, repeats=settings.throughput_repeats,
                                                seed=settings.eval_seed)
    if compute:
        report["compute"] = compute
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "rlvr_report.json", report)
    (out_dir / "rlvr_report.md").write_text(report_markdown(report))
    plot_accuracy_vs_n(rows, out_dir / "rlvr_accuracy_vs_n.png", f"{task.name}: held-out accuracy vs N")
    if record is not None:
        record_figures(report, record)
    return report


def record_figures(report: dict[str, Any], record: Callable[..., None]) -> None:
    """The report's headline figures as events of the run (optimization_analysis.json)."""
    rows = report["accuracy_vs_n"]
    greedy = next(r for r in rows if r["decoding"] == "greedy")
    record("accuracy_vs_n", task=report["task"], problems=report["problems"],
           accuracy={r["decoding"]: r["accuracy"] for r in rows},
           tokens_per_prompt={r["decoding"]: r["tokens_per_prompt"] for r in rows},
           wall_s={r["decoding"]: r["wall_s"] for r in rows}, greedy=greedy["accuracy"])
    if "throughput" in report:
        t = report["throughput"]
        record("paths_per_s", paths=t["paths"], batched=t["batched_paths_per_s"], one_by_one=t["one_by_one_paths_per_s"],
               median_ratio=t["median_ratio"], ci_low=t["ci_low"], ci_high=t["ci_high"], verdict=t["verdict"],
               identical=t["identical_paths"])
    if "warmup_vs_final" in report:
        w = report["warmup_vs_final"]
        record("warmup_vs_final", delta_points=w["delta_points"], warmup=w["warmup"]["accuracy"],
               final=w["final"]["accuracy"])


# -- rendering --------------------------------------------------------------------------------------


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def accuracy_table(rows: Sequence[dict[str, Any]], verifiable: bool) -> str:
    oracle = "any path right" if not verifiable else "any path verified"
    return markdown_table(
        ["decoding", "selection", "accuracy %", "95% CI", f"{oracle} %", "paths/prompt", "tokens/prompt", "wall s"],
        [[r["decoding"], r["selection"], _pct(r["accuracy"]), f"[{_pct(r['ci95'][0])}, {_pct(r['ci95'][1])}]",
          _pct(r["pass_at_n"]), f"{r['paths_per_prompt']:.2f}", f"{r['tokens_per_prompt']:.1f}", f"{r['wall_s']:.2f}"]
         for r in rows])


def throughput_line(t: dict[str, Any]) -> str:
    return (f"Paths/s at N={t['paths']} ({t['prompts']} prompts, T={t['temperature']}): one batch per prompt "
            f"{t['batched_paths_per_s']:.0f} vs one path at a time {t['one_by_one_paths_per_s']:.0f}; "
            f"median of {t['n']} interleaved pairwise ratios "
            f"**{format_ratio(t)}** (95% interval, {t['verdict']}); "
            f"same paths both ways: {'yes' if t['identical_paths'] else 'NO'}.")


def compute_table(compute: dict[str, Any]) -> str:
    """One row per training phase ({phase: {counter: value}}), or one row for a single run's counters."""
    phases = compute if all(isinstance(v, dict) for v in compute.values()) else {"run": compute}
    keys = list(dict.fromkeys(k for v in phases.values() for k in v))
    return markdown_table(["phase", *keys], [[name, *(v.get(k) for k in keys)] for name, v in phases.items()])


def report_markdown(report: dict[str, Any]) -> str:
    lines = [f"## RLVR: {report['task']} ({report['problems']} held-out problems, split '{report['split']}')", ""]
    if report.get("warmup_vs_final"):
        w = report["warmup_vs_final"]
        lines += [f"Greedy accuracy after the supervised warm-up {_pct(w['warmup']['accuracy'])}% -> after GRPO "
                  f"{_pct(w['final']['accuracy'])}% ({w['delta_points']:+.1f} points).", ""]
    lines += [accuracy_table(report["accuracy_vs_n"], report["verifiable_at_inference"]), ""]
    if report.get("throughput"):
        lines += [throughput_line(report["throughput"]), ""]
    if report.get("compute"):
        lines += ["Training compute (what the task forward did):", "", compute_table(report["compute"]), ""]
    lines += ["![accuracy vs N](rlvr_accuracy_vs_n.png)", ""]
    return "\n".join(lines)


def plot_accuracy_vs_n(rows: Sequence[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sampled = [r for r in rows if r["decoding"].startswith("N=") and "adaptive" not in r["decoding"]]
    greedy = next((r for r in rows if r["decoding"] == "greedy"), None)
    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [r["n"] for r in sampled]
    ys = [100 * r["accuracy"] for r in sampled]
    err = [[max(0.0, 100 * (r["accuracy"] - r["ci95"][0])) for r in sampled],
           [max(0.0, 100 * (r["ci95"][1] - r["accuracy"])) for r in sampled]]
    ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=f"{sampled[0]['selection'] if sampled else ''} of N")
    ax.plot(xs, [100 * r["pass_at_n"] for r in sampled], "--", color="grey", label="any path right (oracle)")
    if greedy is not None:
        ax.axhline(100 * greedy["accuracy"], color="C3", lw=1, label="greedy")
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs, [str(x) for x in xs])
    ax.set_xlabel("paths per prompt (N)")
    ax.set_ylabel("held-out accuracy %")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
