"""The rlvr plugin's benchmark: every figure in plugins/rlvr/README.md comes from one run of this script.

    python plugins/rlvr/bench_rlvr.py --out /tmp/rlvr-bench

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
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from ryzen_core import cpu_features


def main(argv: list[str] | None = None) -> int:
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
    args = parser.parse_args(argv)

    from ryzen_core.checkpoint import latest_checkpoint
    from ryzen_core.plugins import PluginHost
    from ryzen_core.report import markdown_table, write_json
    from ryzen_core.run import prepare

    from ryzen_plugin_rlvr import plugin
    from ryzen_plugin_rlvr.evaluate import (accuracy_table, accuracy_vs_n, greedy_accuracy, paths_throughput,
                                            plot_accuracy_vs_n, t_interval, throughput_line, vote_diagnostics)
    from ryzen_plugin_rlvr.multipath import SolveConfig, solve
    from ryzen_plugin_rlvr.pipeline import TASK_MODEL_DEFAULTS, phase_config, prepare_task_run, train_phase
    from ryzen_plugin_rlvr.sampling import TaskCodec

    torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",")]
    started, load_before = time.perf_counter(), os.getloadavg()
    host = PluginHost()
    host.register(plugin, "rlvr")
    overrides = [*TASK_MODEL_DEFAULTS, f"train.threads={args.threads}", "train.eval_every=250",
                 "train.checkpoint_every=250", "rlvr.monitor_problems=200", *args.overrides]
    config = prepare(host, None, overrides, ["rlvr"], args.out)
    settings = host.settings["rlvr"]
    task, tokenizer, data = prepare_task_run(config, host, args.out)
    codec = TaskCodec(tokenizer)
    problems = task.problems(args.problems, seed=settings.eval_seed, split="test")
    ns = settings.eval_paths
    T, top_p = settings.temperature, settings.top_p

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - started:6.0f}s] {message}", flush=True)

    def compute_row(label: str, phase: dict) -> list:
        c = phase["compute"]
        return [label, phase["summary"]["steps"], f"{phase['wall_s']:.1f}", c["sft_tokens"], c["sampled_completions"],
                c["generated_tokens"], c["policy_tokens"]]

    # 1. warm-up
    warm = train_phase(phase_config(config, max_steps=args.sft_steps), host, args.out / "sft", data, "sft",
                       phase="sft")
    warm_ckpt = latest_checkpoint(args.out / "sft")
    log(f"warm-up: {args.sft_steps} steps in {warm['wall_s']:.0f}s")
    warm_rows = accuracy_vs_n(warm["model"], codec, task, problems, ns, T, top_p, seed=settings.eval_seed)
    warm_greedy = warm_rows[0]["accuracy"]
    # The same N=8 paths as the table's row (same seeds), kept to see where the vote loses.
    warm_diag = vote_diagnostics(task, problems, solve(warm["model"], codec, task, problems, SolveConfig(
        paths=8, temperature=T, top_p=top_p, seed=settings.eval_seed)))
    log(f"warm-up greedy {warm_greedy:.3f}; vote diagnostics {warm_diag}")

    # 2. GRPO and the continued-SFT control, per seed
    grpo_config = lambda seed: phase_config(config, max_steps=args.grpo_steps, lr=args.grpo_lr,  # noqa: E731
                                            warmup_steps=min(10, args.grpo_steps), seed=seed)
    per_seed, compute_rows, grpo_rows0, throughput = [], [compute_row("warm-up (SFT)", warm)], None, None
    for seed in seeds:
        grpo = train_phase(grpo_config(seed), host, args.out / f"grpo-seed{seed}", data, f"grpo{seed}", phase="grpo",
                           init_from=warm_ckpt, grpo_lr_scale=1.0)
        # The control gets the GRPO run's training time (its steps' wall time), not its step count:
        # a GRPO step samples and scores groups, so it costs several supervised steps.
        budget = grpo["summary"]["wall_s"]
        control_config = phase_config(config, max_seconds=budget, max_steps=None, lr=args.grpo_lr,
                                      warmup_steps=min(10, args.grpo_steps), seed=seed)
        control = train_phase(control_config, host, args.out / f"sft-more-seed{seed}", data, f"sftmore{seed}",
                              phase="sft", init_from=warm_ckpt)
        rows = accuracy_vs_n(grpo["model"], codec, task, problems, [8], T, top_p, seed=settings.eval_seed,
                             adaptive_n=None) if seed != seeds[0] else None
        if seed == seeds[0]:
            grpo_rows0 = accuracy_vs_n(grpo["model"], codec, task, problems, ns, T, top_p, seed=settings.eval_seed)
            rows = grpo_rows0
            throughput = paths_throughput(grpo["model"], codec, task, problems[:16], n=8, temperature=T, top_p=top_p,
                                          warmup=1, repeats=7, seed=settings.eval_seed)
        greedy = rows[0]["accuracy"]
        maj8 = next(r for r in rows if r["decoding"] == "N=8")["accuracy"]
        more = greedy_accuracy(control["model"], codec, task, problems)["accuracy"]
        per_seed.append({"seed": seed, "grpo_greedy": greedy, "grpo_majority8": maj8, "control_greedy": more,
                         "grpo_train_s": budget, "control_train_s": control["summary"]["wall_s"],
                         "control_steps": control["summary"]["steps"],
                         "grpo_adaptations": grpo["adaptations"]})
        compute_rows += [compute_row(f"GRPO seed {seed}", grpo), compute_row(f"continued SFT seed {seed}", control)]
        log(f"seed {seed}: GRPO greedy {greedy:.3f} maj@8 {maj8:.3f}; continued SFT {more:.3f}")

    # 3. direct answers: what voting does when every path is the same computation
    direct = None
    if args.direct_steps:
        direct_opts = dict(settings.task_options, chain=False)
        host.settings["rlvr"] = settings.model_copy(update={"task_options": direct_opts})
        d_task, _, d_data = prepare_task_run(config, host, args.out / "direct")
        d = train_phase(phase_config(config, max_steps=args.direct_steps), host, args.out / "direct" / "sft", d_data,
                        "direct", phase="sft")
        host.settings["rlvr"] = settings
        d_problems = d_task.problems(args.problems, seed=settings.eval_seed, split="test")
        direct = {"rows": accuracy_vs_n(d["model"], codec, d_task, d_problems, ns, T, top_p, seed=settings.eval_seed),
                  "wall_s": d["wall_s"], "steps": args.direct_steps}
        compute_rows.append(compute_row("direct-answer SFT", d))
        log("direct-answer model done")

    deltas = [100 * (s["grpo_greedy"] - warm_greedy) for s in per_seed]
    control_deltas = [100 * (s["control_greedy"] - warm_greedy) for s in per_seed]
    gaps = [100 * (s["grpo_majority8"] - s["grpo_greedy"]) for s in per_seed]
    result = {
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "machine": {"cpu": cpu_features().model, "usable_cores": len(os.sched_getaffinity(0)), "torch_threads": args.threads,
                    "torch": torch.__version__, "python": platform.python_version(),
                    "load_average_before": load_before, "load_average_after": os.getloadavg()},
        "task": {"name": task.name, "options": settings.task_options, "eval_problems": len(problems),
                 "example": f"{problems[0].prompt}{problems[0].solution}"},
        "model_parameters": sum(p.numel() for p in warm["model"].parameters()),
        "config": {"sft_steps": args.sft_steps, "sft_lr": config.train.lr, "sft_batch": settings.sft_batch,
                   "grpo_steps": args.grpo_steps, "grpo_lr": args.grpo_lr, "group_prompts": settings.group_prompts,
                   "group_size": settings.group_size, "group_temperature": settings.group_temperature,
                   "kl_coef": settings.kl_coef, "eval_temperature": T, "eval_top_p": top_p},
        "warmup": {"accuracy_vs_n": warm_rows, "vote_diagnostics_n8": warm_diag},
        "grpo_seed0": {"accuracy_vs_n": grpo_rows0},
        "per_seed": per_seed,
        "grpo_minus_warmup_points": t_interval(deltas),
        "control_minus_warmup_points": t_interval(control_deltas),
        "majority8_minus_greedy_points_grpo": t_interval(gaps),
        "throughput": throughput,
        "direct": direct,
        "compute_headers": ["phase", "steps", "wall s", "SFT tokens", "sampled completions", "generated tokens",
                            "GRPO trained tokens"],
        "compute": compute_rows,
        "total_wall_s": time.perf_counter() - started,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "bench_rlvr.json", result)
    plot_accuracy_vs_n(grpo_rows0, args.out / "accuracy_vs_n.png", "held-out accuracy vs N (GRPO model)")

    def ci(t):
        return f"{t['mean']:+.1f} points, 95% CI [{t['low']:+.1f}, {t['high']:+.1f}] over {t['n']} seeds" \
            if t["low"] is not None else f"{t['mean']:+.1f} points (one seed: no interval)"

    m = result["machine"]
    lines = [
        f"Machine: {m['cpu']}, {m['usable_cores']} cores, torch {m['torch']} on {m['torch_threads']} thread(s); "
        f"load average {m['load_average_before'][0]:.1f} before, {m['load_average_after'][0]:.1f} after "
        f"(shared machine). Total wall time {result['total_wall_s']:.0f} s.",
        f"Task: {task.name} {settings.task_options or ''}, e.g. `{result['task']['example']}`; "
        f"{len(problems)} held-out problems; model {result['model_parameters']:,} parameters.",
        "",
        f"### Accuracy vs N, GRPO model (seed {seeds[0]}), T={T}, top-p={top_p}", "",
        accuracy_table(grpo_rows0, task.verifiable_at_inference), "",
        "### Accuracy vs N, warm-up model", "",
        accuracy_table(warm_rows, task.verifiable_at_inference), "",
        f"Where the N=8 vote loses (warm-up model): the right answer was among the paths but lost the vote on "
        f"{warm_diag['outvoted']} of {warm_diag['problems']} problems, by {warm_diag['winner_votes_when_outvoted']:.2f} "
        f"votes for the winning wrong answer to {warm_diag['right_votes_when_outvoted']:.2f} for the right one. "
        f"Outcomes of all {sum(warm_diag['path_outcomes'].values())} paths: "
        + ", ".join(f"{k} {v}" for k, v in sorted(warm_diag["path_outcomes"].items())) + ".", "",
        "### GRPO vs the warm-up checkpoint (greedy, held-out)", "",
        markdown_table(["seed", "warm-up %", "GRPO %", "GRPO - warm-up", "GRPO train s",
                        "SFT same time %", "SFT - warm-up", "SFT steps", "GRPO maj@8 %"],
                       [[s["seed"], f"{100 * warm_greedy:.1f}", f"{100 * s['grpo_greedy']:.1f}", f"{d:+.1f}",
                         f"{s['grpo_train_s']:.0f}", f"{100 * s['control_greedy']:.1f}", f"{c:+.1f}",
                         s["control_steps"], f"{100 * s['grpo_majority8']:.1f}"]
                        for s, d, c in zip(per_seed, deltas, control_deltas)]),
        "",
        f"- GRPO - warm-up: {ci(result['grpo_minus_warmup_points'])}.",
        f"- Control, supervised training continued for the same time at the same rate - warm-up: "
        f"{ci(result['control_minus_warmup_points'])}.",
        f"- Majority@8 - greedy on the GRPO models: {ci(result['majority8_minus_greedy_points_grpo'])}.",
        "",
        "### Paths/s", "", throughput_line(throughput), "",
    ]
    if direct:
        lines += [f"### Direct answers (no chain), warm-up {direct['steps']} steps", "",
                  accuracy_table(direct["rows"], False), ""]
    lines += ["### Compute", "", markdown_table(result["compute_headers"], compute_rows), ""]
    text = "\n".join(lines)
    (args.out / "bench_rlvr.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
