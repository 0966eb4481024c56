"""Training metrics: what each step and each evaluation measured, anomaly flags, and their files.

Units: loss in nats/token, lr as applied, tokens_per_s counts input tokens of the whole
global batch (all processes), step_time_s is wall time of one optimizer step including
data, forward, backward and the update; peak_rss_mb is the process's peak resident set
size as the kernel reports it (getrusage ru_maxrss).
"""
from __future__ import annotations

import csv
import math
import resource
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

STEP_FIELDS = ["step", "tokens", "loss", "lr", "grad_norm", "step_time_s", "tokens_per_s", "flags"]
WINDOW = 20  # steps of history an anomaly is judged against


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


@dataclass
class MetricsCollector:
    steps: list[dict[str, Any]] = field(default_factory=list)
    evals: list[dict[str, Any]] = field(default_factory=list)
    anomalies: list[dict[str, Any]] = field(default_factory=list)
    adaptations: list[dict[str, Any]] = field(default_factory=list)

    def log_step(self, step: int, tokens: int, loss: float, lr: float, grad_norm: float,
                 step_time_s: float, tokens_in_step: int, skipped: bool = False) -> dict[str, Any]:
        flags = []
        recent = [s for s in self.steps[-WINDOW:] if "nan_skip" not in s["flags"]]
        if skipped:
            flags.append("nan_skip")
        elif len(recent) >= WINDOW // 2:
            median_loss = statistics.median(s["loss"] for s in recent)
            median_tps = statistics.median(s["tokens_per_s"] for s in recent)
            if loss > 1.5 * median_loss:
                flags.append("loss_spike")
            if tokens_in_step / step_time_s < 0.5 * median_tps:
                flags.append("throughput_drop")
        row = {
            "step": step, "tokens": tokens, "loss": loss, "lr": lr, "grad_norm": grad_norm,
            "step_time_s": step_time_s, "tokens_per_s": tokens_in_step / step_time_s, "flags": flags,
        }
        self.steps.append(row)
        for flag in flags:
            self.anomalies.append({"step": step, "kind": flag, "loss": loss, "tokens_per_s": row["tokens_per_s"]})
        return row

    def log_eval(self, step: int, tokens: int, val_loss: float, wall_s: float) -> dict[str, Any]:
        since = [s["loss"] for s in self.steps if s["step"] > (self.evals[-1]["step"] if self.evals else 0)
                 and "nan_skip" not in s["flags"]]
        row = {
            "step": step, "tokens": tokens,
            "train_loss": statistics.fmean(since) if since else None,
            "val_loss": val_loss, "val_perplexity": math.exp(min(val_loss, 50.0)),
            "wall_s": wall_s, "peak_rss_mb": peak_rss_mb(),
        }
        self.evals.append(row)
        return row

    def log_adaptation(self, step: int, plugin: str, changes: dict[str, Any]) -> None:
        self.adaptations.append({"step": step, "plugin": plugin, "changes": changes})

    def state(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "MetricsCollector":
        return cls(**state)

    def summary(self) -> dict[str, Any]:
        good = [s for s in self.steps if "nan_skip" not in s["flags"]]
        # The first steps pay for allocation and thread start-up; the median ignores them.
        tps = [s["tokens_per_s"] for s in good]
        return {
            "steps": len(self.steps),
            "tokens": self.steps[-1]["tokens"] if self.steps else 0,
            "final_train_loss": good[-1]["loss"] if good else None,
            "final_val_loss": self.evals[-1]["val_loss"] if self.evals else None,
            "best_val_loss": min((e["val_loss"] for e in self.evals), default=None),
            "final_val_perplexity": self.evals[-1]["val_perplexity"] if self.evals else None,
            "median_tokens_per_s": statistics.median(tps) if tps else None,
            "wall_s": self.evals[-1]["wall_s"] if self.evals else None,
            "peak_rss_mb": peak_rss_mb(),
            "nan_skips": sum("nan_skip" in s["flags"] for s in self.steps),
            "anomalies": len(self.anomalies),
        }

    def write_csv(self, path: Path) -> None:
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=STEP_FIELDS)
            writer.writeheader()
            for row in self.steps:
                writer.writerow(dict(row, flags=";".join(row["flags"])))
