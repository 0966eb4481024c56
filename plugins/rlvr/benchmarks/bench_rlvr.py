"""The rlvr plugin's benchmark: every figure in plugins/rlvr/README.md comes from one run of this script.

    python plugins/rlvr/benchmarks/bench_rlvr.py --out /tmp/rlvr-bench

1. Supervised warm-up of a small task model (core Trainer, char tokens) on generated arithmetic.
2. GRPO from the warm-up checkpoint, once per seed; and, as a control, supervised training continued
   from the same checkpoint at the same learning rate for the same training time, once per seed.
3. Held-out accuracy (test split, never trained on) as a function of N, for the warm-up and GRPO models.
4. Paths/s generating N=8 paths per prompt as one batch vs one path at a time, interleaved pairs.
5. A direct-answer model (no reasoning chain) trained the same way, to show what majority voting does
   without several paths to the answer.
Writes bench_rlvr.json and bench_rlvr.md into --out.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch

from ryzen_core import PluginHost, cpu_features, latest_checkpoint, load_config, markdown_table, write_json
from ryzen_plugin_rlvr.evaluate import (accuracy_table, accuracy_vs_n, greedy_accuracy, paths_throughput,
                                        plot_accuracy_vs_n, t_interval, throughput_line, vote_diagnostics)
from ryzen_plugin_rlvr.multipath import SolveConfig, solve
from ryzen_plugin_rlvr.pipeline import phase_config, prepare_task_run, train_phase
from ryzen_plugin_rlvr.plugin import RlvrPlugin
from ryzen_plugin_rlvr.sampling import TaskCodec
from ryzen_plugin_rlvr.settings import TASK_MODEL_DEFAULTS, rlvr_settings

COMPUTE_HEADERS = ["phase", "steps", "wall s", "SFT tokens", "sampled completions", "generated tokens",
                   "GRPO trained tokens"]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--sft-steps", type=int, default=1000)
    parser.add_argument("--grpo-steps", type=int, default=150)
    parser.add_argument("--grpo-lr", type=float, default=5e-5)
    parser.add_argument("--seeds", default="0,1,2", help="GRPO (and control) seeds, comma-separated")
    parser.add_argument("--problems", type=int, default=500, help="held-out test problems")
    parser.add_argument("--direct-steps", type=int, default=1000, help="0 skips the direct-answer model")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="extra config overrides")
    return parser.parse_args(argv)


def compute_row(label: str, phase: dict) -> list:
    c = phase["compute"]
    return [label, phase["summary"]["steps"], f"{phase['wall_s']:.1f}", c["sft_tokens"], c["sampled_completions"],
            c["generated_tokens"], c["policy_tokens"]]


class Bench:
    """One benchmark run: the task model's config, data and held-out problems, shared by its steps."""

    def __init__(self, args: argparse.Namespace):
        self.args, self.started = args, time.perf_counter()
        self.seeds = [int(s) for s in args.seeds.split(",")]
        self.host = PluginHost()
        self.host.register(RlvrPlugin, "rlvr")
        overrides = [*TASK_MODEL_DEFAULTS, f"train.threads={args.threads}", "train.eval_every=250",
                     "train.checkpoint_every=250", "rlvr.monitor_problems=200", *args.overrides]
        self.config = load_config(None, overrides, ["rlvr"])
        self.config.output.dir = args.out
        self.settings = self.host.settings["rlvr"] = rlvr_settings(self.config)
        self.task, tokenizer, self.data = prepare_task_run(self.config, self.host, args.out)
        self.codec = TaskCodec(tokenizer)
        self.problems = self.task.problems(args.problems, seed=self.settings.eval_seed, split="test")
        self.compute_rows: list[list] = []

    def log(self, message: str) -> None:
        print(f"[{time.perf_counter() - self.started:6.0f}s] {message}", flush=True)

    def accuracy(self, model, ns=None, task=None, problems=None, **options) -> list[dict]:
        s = self.settings
        return accuracy_vs_n(model, self.codec, task or self.task, problems or self.problems, ns or s.eval_paths,
                             s.temperature, s.top_p, seed=s.eval_seed, **options)

    def warm_up(self) -> dict:
        """1. The supervised warm-up, its accuracy vs N, and where its N=8 vote loses."""
        args, s = self.args, self.settings
        warm = train_phase(phase_config(self.config, max_steps=args.sft_steps), self.host, args.out / "sft",
                           self.data, "sft", phase="sft")
        self.log(f"warm-up: {args.sft_steps} steps in {warm['wall_s']:.0f}s")
        warm["rows"] = self.accuracy(warm["model"])
        # The same N=8 paths as the table's row (same seeds), kept to see where the vote loses.
        warm["diagnostics"] = vote_diagnostics(self.task, self.problems, solve(
            warm["model"], self.codec, self.task, self.problems,
            SolveConfig(paths=8, temperature=s.temperature, top_p=s.top_p, seed=s.eval_seed)))
        self.log(f"warm-up greedy {warm['rows'][0]['accuracy']:.3f}; vote diagnostics {warm['diagnostics']}")
        self.compute_rows.append(compute_row("warm-up (SFT)", warm))
        return warm

    def grpo_and_control(self, seed: int, warm_checkpoint: Path) -> tuple[dict, dict]:
        """2. GRPO from the warm-up checkpoint, and supervised training continued for the same time."""
        args = self.args
        grpo_config = phase_config(self.config, max_steps=args.grpo_steps, lr=args.grpo_lr,
                                   warmup_steps=min(10, args.grpo_steps), seed=seed)
        grpo = train_phase(grpo_config, self.host, args.out / f"grpo-seed{seed}", self.data, f"grpo{seed}",
                           phase="grpo", init_from=warm_checkpoint, grpo_lr_scale=1.0)
        # The control gets the GRPO run's training time (its steps' wall time), not its step count:
        # a GRPO step samples and scores groups, so it costs several supervised steps.
        control_config = phase_config(self.config, max_seconds=grpo["summary"]["wall_s"], max_steps=None,
                                      lr=args.grpo_lr, warmup_steps=min(10, args.grpo_steps), seed=seed)
        control = train_phase(control_config, self.host, args.out / f"sft-more-seed{seed}", self.data,
                              f"sftmore{seed}", phase="sft", init_from=warm_checkpoint)
        self.compute_rows += [compute_row(f"GRPO seed {seed}", grpo), compute_row(f"continued SFT seed {seed}", control)]
        return grpo, control

    def seeds_against_warm_up(self, warm: dict) -> dict:
        """2. For each seed: GRPO and the control, scored; the first seed's GRPO model in full, with paths/s."""
        s, warm_checkpoint = self.settings, latest_checkpoint(self.args.out / "sft")
        per_seed, first = [], {}
        for seed in self.seeds:
            grpo, control = self.grpo_and_control(seed, warm_checkpoint)
            if seed == self.seeds[0]:
                rows = first["rows"] = self.accuracy(grpo["model"])
                first["throughput"] = paths_throughput(grpo["model"], self.codec, self.task, self.problems[:16], n=8,
                                                       temperature=s.temperature, top_p=s.top_p, warmup=1, repeats=7,
                                                       seed=s.eval_seed)
            else:
                rows = self.accuracy(grpo["model"], [8], adaptive_n=None)
            greedy = rows[0]["accuracy"]
            maj8 = next(r for r in rows if r["decoding"] == "N=8")["accuracy"]
            more = greedy_accuracy(control["model"], self.codec, self.task, self.problems)["accuracy"]
            per_seed.append({"seed": seed, "grpo_greedy": greedy, "grpo_majority8": maj8, "control_greedy": more,
                             "grpo_train_s": grpo["summary"]["wall_s"], "control_train_s": control["summary"]["wall_s"],
                             "control_steps": control["summary"]["steps"], "grpo_adaptations": grpo["adaptations"]})
            self.log(f"seed {seed}: GRPO greedy {greedy:.3f} maj@8 {maj8:.3f}; continued SFT {more:.3f}")
        return {"per_seed": per_seed, "rows": first["rows"], "throughput": first["throughput"]}

    def direct_answers(self) -> dict | None:
        """3. What voting does when every path is the same computation: a model trained on bare answers."""
        args, settings = self.args, self.settings
        if not args.direct_steps:
            return None
        self.host.settings["rlvr"] = settings.model_copy(
            update={"task_options": dict(settings.task_options, chain=False)})
        try:
            task, _, data = prepare_task_run(self.config, self.host, args.out / "direct")
            d = train_phase(phase_config(self.config, max_steps=args.direct_steps), self.host,
                            args.out / "direct" / "sft", data, "direct", phase="sft")
        finally:
            self.host.settings["rlvr"] = settings
        problems = task.problems(args.problems, seed=settings.eval_seed, split="test")
        self.compute_rows.append(compute_row("direct-answer SFT", d))
        self.log("direct-answer model done")
        return {"rows": self.accuracy(d["model"], task=task, problems=problems), "wall_s": d["wall_s"],
                "steps": args.direct_steps}

    def result(self, argv: list[str] | None, load_before, warm: dict, seeds: dict, direct: dict | None) -> dict:
        args, s, per_seed, warm_greedy = self.args, self.settings, seeds["per_seed"], warm["rows"][0]["accuracy"]
        return {
            "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
            "machine": {"cpu": cpu_features().model, "usable_cores": len(os.sched_getaffinity(0)),
                        "torch_threads": args.threads, "torch": torch.__version__, "python": platform.python_version(),
                        "load_average_before": load_before, "load_average_after": os.getloadavg()},
            "task": {"name": self.task.name, "options": s.task_options, "eval_problems": len(self.problems),
                     "example": f"{self.problems[0].prompt}{self.problems[0].solution}"},
            "model_parameters": sum(p.numel() for p in warm["model"].parameters()),
            "config": {"sft_steps": args.sft_steps, "sft_lr": self.config.train.lr, "sft_batch": s.sft_batch,
                       "grpo_steps": args.grpo_steps, "grpo_lr": args.grpo_lr, "group_prompts": s.group_prompts,
                       "group_size": s.group_size, "group_temperature": s.group_temperature,
                       "kl_coef": s.kl_coef, "eval_temperature": s.temperature, "eval_top_p": s.top_p},
            "warmup": {"accuracy_vs_n": warm["rows"], "vote_diagnostics_n8": warm["diagnostics"]},
            "grpo_seed0": {"accuracy_vs_n": seeds["rows"]},
            "per_seed": per_seed,
            "grpo_minus_warmup_points": t_interval([100 * (p["grpo_greedy"] - warm_greedy) for p in per_seed]),
            "control_minus_warmup_points": t_interval([100 * (p["control_greedy"] - warm_greedy) for p in per_seed]),
            "majority8_minus_greedy_points_grpo": t_interval([100 * (p["grpo_majority8"] - p["grpo_greedy"])
                                                              for p in per_seed]),
            "throughput": seeds["throughput"],
            "direct": direct,
            "compute_headers": COMPUTE_HEADERS,
            "compute": self.compute_rows,
            "total_wall_s": time.perf_counter() - self.started,
        }


def interval_text(t: dict) -> str:
    return f"{t['mean']:+.1f} points, 95% CI [{t['low']:+.1f}, {t['high']:+.1f}] over {t['n']} seeds" \
        if t["low"] is not None else f"{t['mean']:+.1f} points (one seed: no interval)"


def seeds_table(result: dict) -> str:
    warm_greedy = result["warmup"]["accuracy_vs_n"][0]["accuracy"]
    rows = [[s["seed"], f"{100 * warm_greedy:.1f}", f"{100 * s['grpo_greedy']:.1f}",
             f"{100 * (s['grpo_greedy'] - warm_greedy):+.1f}", f"{s['grpo_train_s']:.0f}",
             f"{100 * s['control_greedy']:.1f}", f"{100 * (s['control_greedy'] - warm_greedy):+.1f}",
             s["control_steps"], f"{100 * s['grpo_majority8']:.1f}"] for s in result["per_seed"]]
    return markdown_table(["seed", "warm-up %", "GRPO %", "GRPO - warm-up", "GRPO train s", "SFT same time %",
                           "SFT - warm-up", "SFT steps", "GRPO maj@8 %"], rows)


def markdown(result: dict, verifiable: bool) -> str:
    m, c, d = result["machine"], result["config"], result["warmup"]["vote_diagnostics_n8"]
    lines = [
        f"Machine: {m['cpu']}, {m['usable_cores']} cores, torch {m['torch']} on {m['torch_threads']} thread(s); "
        f"load average {m['load_average_before'][0]:.1f} before, {m['load_average_after'][0]:.1f} after "
        f"(shared machine). Total wall time {result['total_wall_s']:.0f} s.",
        f"Task: {result['task']['name']} {result['task']['options'] or ''}, e.g. `{result['task']['example']}`; "
        f"{result['task']['eval_problems']} held-out problems; model {result['model_parameters']:,} parameters.",
        "",
        f"### Accuracy vs N, GRPO model (seed {result['per_seed'][0]['seed']}), T={c['eval_temperature']}, "
        f"top-p={c['eval_top_p']}", "",
        accuracy_table(result["grpo_seed0"]["accuracy_vs_n"], verifiable), "",
        "### Accuracy vs N, warm-up model", "",
        accuracy_table(result["warmup"]["accuracy_vs_n"], verifiable), "",
        f"Where the N=8 vote loses (warm-up model): the right answer was among the paths but lost the vote on "
        f"{d['outvoted']} of {d['problems']} problems, by {d['winner_votes_when_outvoted']:.2f} "
        f"votes for the winning wrong answer to {d['right_votes_when_outvoted']:.2f} for the right one. "
        f"Outcomes of all {sum(d['path_outcomes'].values())} paths: "
        + ", ".join(f"{k} {v}" for k, v in sorted(d["path_outcomes"].items())) + ".", "",
        "### GRPO vs the warm-up checkpoint (greedy, held-out)", "", seeds_table(result), "",
        f"- GRPO - warm-up: {interval_text(result['grpo_minus_warmup_points'])}.",
        f"- Control, supervised training continued for the same time at the same rate - warm-up: "
        f"{interval_text(result['control_minus_warmup_points'])}.",
        f"- Majority@8 - greedy on the GRPO models: {interval_text(result['majority8_minus_greedy_points_grpo'])}.",
        "",
        "### Paths/s", "", throughput_line(result["throughput"]), "",
    ]
    if result["direct"]:
        lines += [f"### Direct answers (no chain), warm-up {result['direct']['steps']} steps", "",
                  accuracy_table(result["direct"]["rows"], False), ""]
    lines += ["### Compute", "", markdown_table(result["compute_headers"], result["compute"]), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    bench = Bench(args)
    warm = bench.warm_up()
    seeds = bench.seeds_against_warm_up(warm)
    direct = bench.direct_answers()
    result = bench.result(argv, load_before, warm, seeds, direct)
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "bench_rlvr.json", result)
    plot_accuracy_vs_n(seeds["rows"], args.out / "accuracy_vs_n.png", "held-out accuracy vs N (GRPO model)")
    text = markdown(result, bench.task.verifiable_at_inference)
    (args.out / "bench_rlvr.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
