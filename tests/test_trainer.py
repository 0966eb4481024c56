"""Training: reproducibility, resume after SIGKILL, DDP equivalence, NaN guard, checkpoints, HF models."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

from helpers import TINY, make_distribution, tiny_sets
from ryzen_core import TrainingError, hookimpl
from ryzen_core.checkpoint import latest_checkpoint
from ryzen_core.config import load_config
from ryzen_core.plugins import PluginHost
from ryzen_core.run import load_data
from ryzen_core.trainer import Trainer


def tiny_config(cache_dir, *extra):
    return load_config(overrides=[*TINY, f"data.cache_dir={cache_dir}", *extra])


def train(cache_dir, tmp_path, plugins=(), host=None, extra=(), resume=False):
    config = tiny_config(cache_dir, *extra)
    host = host or PluginHost()
    trainer = Trainer(config, host, list(plugins), tmp_path, load_data(config))
    return trainer, trainer.fit(resume=resume)


def losses(result):
    return [s["loss"] for s in result.metrics.steps]


def test_same_seed_same_loss_curve_and_loss_goes_down(cache_dir, tmp_path):
    _, a = train(cache_dir, tmp_path / "a", extra=["train.max_steps=12"])
    _, b = train(cache_dir, tmp_path / "b", extra=["train.max_steps=12"])
    assert losses(a) == losses(b)
    assert a.metrics.evals[-1]["val_loss"] < a.metrics.evals[0]["val_loss"]
    _, c = train(cache_dir, tmp_path / "c", extra=["train.max_steps=12", "train.seed=1"])
    assert losses(c) != losses(a)


def test_budget_in_tokens_sets_the_step_count(cache_dir, tmp_path):
    # 4 rows x 32 tokens = 128 tokens per step; 700 tokens -> 6 steps (ceil).
    trainer, result = train(cache_dir, tmp_path, extra=["train.max_steps=null", "train.max_tokens=700"])
    assert trainer.tokens_per_step == 128 and len(result.metrics.steps) == 6


def test_grad_accumulation_matches_the_bigger_batch(cache_dir, tmp_path):
    _, big = train(cache_dir, tmp_path / "big", extra=["train.batch_size=4", "train.max_steps=4"])
    _, acc = train(cache_dir, tmp_path / "acc", extra=["train.batch_size=2", "train.grad_accum=2", "train.max_steps=4"])
    # Same tokens per step; the rows differ (the sampler shuffles by batch), so compare learning, not bits.
    assert acc.metrics.steps[-1]["tokens"] == big.metrics.steps[-1]["tokens"]
    assert abs(acc.metrics.evals[-1]["val_loss"] - big.metrics.evals[-1]["val_loss"]) < 0.05


class PoisonWeights:
    """Turns a weight into NaN before training: every step's loss is NaN, no plugin to blame."""

    @hookimpl
    def on_train_start(self, model):
        with torch.no_grad():
            next(model.parameters()).fill_(float("nan"))


def test_nan_guard_stops_with_a_clear_message(cache_dir, tmp_path):
    host = PluginHost()
    host.register(PoisonWeights(), "poison")
    with pytest.raises(TrainingError, match="stopped after 3 consecutive steps with non-finite loss"):
        train(cache_dir, tmp_path, plugins=["poison"], host=host, extra=["train.max_bad_steps=3"])


class NanAtStep:
    """A transform that returns a NaN loss from its third call on."""

    @hookimpl
    def transform_forward(self, forward):
        calls = {"n": 0}

        def wrapped(x, y):
            calls["n"] += 1
            out = forward(x, y)
            return out.with_loss(out.loss * float("nan")) if calls["n"] >= 3 else out

        return wrapped


def test_plugin_that_produces_nan_is_disabled_and_training_completes(cache_dir, tmp_path):
    host = PluginHost()
    host.register(NanAtStep(), "nanny")
    trainer, result = train(cache_dir, tmp_path, plugins=["nanny"], host=host)
    assert result.disabled == {"nanny": "transform_forward: forward produced a non-finite loss"}
    assert len(result.metrics.steps) == 6
    assert sum("nan_skip" in s["flags"] for s in result.metrics.steps) == 1
    assert math.isfinite(result.metrics.evals[-1]["val_loss"])


class NanGradient(torch.autograd.Function):
    """Identity forward, NaN backward: a finite loss whose gradients are not."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


class NanGradientsFromStep3:
    @hookimpl
    def transform_forward(self, forward):
        calls = {"n": 0}

        def wrapped(x, y):
            calls["n"] += 1
            out = forward(x, y)
            return out.with_loss(NanGradient.apply(out.loss)) if calls["n"] >= 3 else out

        return wrapped


def test_a_plugin_whose_forward_gives_nan_gradients_is_blamed_and_training_goes_on(cache_dir, tmp_path):
    host = PluginHost()
    host.register(NanGradientsFromStep3(), "nangrad")
    _, result = train(cache_dir, tmp_path, plugins=["nangrad"], host=host)
    assert result.disabled == {"nangrad": "transform_forward: forward produced non-finite gradients"}
    assert len(result.metrics.steps) == 6
    assert [s["step"] for s in result.metrics.steps if "nan_skip" in s["flags"]] == [3]
    assert all(torch.isfinite(p).all() for p in result.model.parameters())


def test_interrupted_save_leaves_the_last_good_checkpoint(cache_dir, tmp_path):
    train(cache_dir, tmp_path, extra=["train.max_steps=6"])
    good = latest_checkpoint(tmp_path)
    # What a kill in the middle of the next save leaves behind: a half-written temporary directory.
    half = good.parent / ".step-000009.abc123"
    half.mkdir()
    (half / "model.safetensors").write_bytes(b"\x00" * 10)
    assert latest_checkpoint(tmp_path) == good
    trainer, result = train(cache_dir, tmp_path, extra=["train.max_steps=9"], resume=True)
    assert [s["step"] for s in result.metrics.steps] == list(range(1, 10))


KILLER = """
import os, signal
from ryzen_core import hookimpl

@hookimpl
def on_epoch_end(epoch):
    if str(epoch) == os.environ.get("KILL_AT_EVAL"):
        os.kill(os.getpid(), signal.SIGKILL)
"""


def test_resume_after_sigkill_reproduces_the_uninterrupted_run(ryzen, tmp_path):
    make_distribution(tmp_path, "ryzen-plugin-killer", "killer", "ryzen_killer_mod", KILLER)
    args = ["train", "--plugins", "killer", *tiny_sets("train.max_steps=12")]
    env = {"PYTHONPATH": str(tmp_path)}
    whole = ryzen(*args, "--out", str(tmp_path / "whole"), env=env)
    assert whole.returncode == 0, whole.stderr
    killed = ryzen(*args, "--out", str(tmp_path / "killed"), env=dict(env, KILL_AT_EVAL="3"))
    assert killed.returncode == -9
    # Killed after the evaluation at step 9 and before its checkpoint: the last one is step 6.
    assert latest_checkpoint(tmp_path / "killed").name == "step-000006"
    resumed = ryzen("train", "--resume", str(tmp_path / "killed"), env=env)
    assert resumed.returncode == 0, resumed.stderr
    report = lambda d: json.loads((tmp_path / d / "training_metrics_report.json").read_text())["runs"]["train"]  # noqa
    a, b = report("whole"), report("killed")
    assert b["summary"]["steps"] == 12
    assert b["summary"]["final_train_loss"] == a["summary"]["final_train_loss"]
    assert [e["val_loss"] for e in b["evals"]] == [e["val_loss"] for e in a["evals"]]


def test_bad_jsonl_is_a_config_error(ryzen, tmp_path):
    data = tmp_path / "docs.jsonl"
    data.write_text('{"text": "fine"}\nnot json\n')
    result = ryzen("train", *tiny_sets(f"data.source={data}"), "--out", str(tmp_path / "run"))
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("Error: ") and "line 2" in last and "Traceback" not in result.stderr


def test_two_process_ddp_matches_one_process_with_the_same_global_batch(ryzen, tmp_path):
    common = tiny_sets("train.max_steps=6", "train.threads=1")
    one = ryzen("train", *common, "--set", "train.batch_size=4", "--out", str(tmp_path / "one"))
    assert one.returncode == 0, one.stderr
    two = ryzen("train", "--nproc", "2", *common, "--set", "train.batch_size=2", "--out", str(tmp_path / "two"))
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = _step_losses(tmp_path / "one"), _step_losses(tmp_path / "two")
    assert len(a) == len(b) == 6
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-4
    # Evaluation reads the same rows whatever the process count, so the reports compare.
    summaries = [json.loads((tmp_path / run / "training_metrics_report.json").read_text())["runs"]["train"]["summary"]
                 for run in ("one", "two")]
    for key in ("final_val_loss", "test_loss"):
        assert abs(summaries[0][key] - summaries[1][key]) < 1e-4, key
    assert two.stderr.count("train: test perplexity") == 1  # logged by rank 0 only


def test_distributed_workers_exit_when_their_launcher_is_killed(tmp_path, cache_dir):
    import os
    import signal
    import subprocess
    import sys
    import time

    import psutil

    run = subprocess.Popen([sys.executable, "-m", "ryzen_core.cli", "train", "--nproc", "2",
                            *tiny_sets("train.max_steps=100000", "train.threads=1"), "--out", str(tmp_path / "run")],
                           env=dict(os.environ, RYZEN_CACHE_DIR=str(cache_dir), CI="1"),
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    launcher = psutil.Process(run.pid)
    workers = []
    for _ in range(1200):  # until both workers are training (a loaded machine may take minutes)
        workers = [p for p in launcher.children(recursive=True) if "ryzen_core.cli" in " ".join(p.cmdline())]
        if len(workers) == 2 and (tmp_path / "run" / "training_checkpoint").exists():
            break
        time.sleep(0.5)
    assert len(workers) == 2, "the two workers never started"
    os.kill(run.pid, signal.SIGKILL)
    run.wait()
    gone, alive = psutil.wait_procs(workers, timeout=300)  # SIGTERM ends them at once; only a hang waits this long
    assert alive == [], f"workers still running after their launcher was killed: {[p.pid for p in alive]}"


def _step_losses(run_dir: Path) -> list[float]:
    import csv

    with open(run_dir / "metrics.csv") as f:
        return [float(row["loss"]) for row in csv.DictReader(f)]


def test_hf_llama_trains_from_a_config_and_saves_pretrained(ryzen, tmp_path):
    from ryzen_core.models import tiny_llama_config

    config_file = tmp_path / "llama.json"
    config_file.write_text(json.dumps(tiny_llama_config(vocab_size=300, hidden=32, layers=1, heads=2, kv_heads=1,
                                                         intermediate=64, max_positions=64)))
    out = tmp_path / "run"
    result = ryzen("train", *tiny_sets("model.source=hf", f"model.hf_config={config_file}"), "--out", str(out))
    assert result.returncode == 0, result.stderr
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out / "hf_model", local_files_only=True)
    assert model.config.model_type == "llama"
    # The saved directory carries its tokenizer, so training can continue from it.
    again = ryzen("train", *tiny_sets("model.source=hf", f"model.hf_path={out / 'hf_model'}"),
                  "--out", str(tmp_path / "again"))
    assert again.returncode == 0, again.stderr


def test_early_stopping_ends_training_when_validation_stops_improving(cache_dir, tmp_path):
    # A learning rate this small cannot move validation loss by the 1e-4 that counts as improvement.
    trainer, result = train(cache_dir, tmp_path, extra=["train.lr=1e-9", "train.max_steps=60", "train.eval_every=2",
                                                        "train.early_stop_patience=2"])
    assert result.stopped_because == "early stopping (no improvement in 2 evaluations)"
    assert len(result.metrics.steps) == 6  # evaluations at 2 (best), 4 and 6 (no improvement twice)


def _interrupt_after(args: list[str], line: str, cache_dir, cwd=None):
    """Start `ryzen ARGS`, send Ctrl-C (SIGINT) once `line` appears on stderr; (exit code, stderr)."""
    import os
    import signal
    import subprocess
    import sys

    run = subprocess.Popen([sys.executable, "-m", "ryzen_core.cli", *args], stderr=subprocess.PIPE, text=True,
                           stdout=subprocess.DEVNULL, env=dict(os.environ, RYZEN_CACHE_DIR=str(cache_dir), CI="1"))
    seen = []
    for text in run.stderr:
        seen.append(text)
        if line in text:
            run.send_signal(signal.SIGINT)
            break
    rest = run.stderr.read()  # the same buffered reader: communicate() would miss what it already holds
    run.wait(timeout=1800)  # only a hang reaches the timeout
    return run.returncode, "".join(seen) + rest


def test_ctrl_c_checkpoints_the_step_under_way_and_exits_130(tmp_path, cache_dir):
    out = tmp_path / "run"
    code, stderr = _interrupt_after(["train", *tiny_sets("train.max_steps=100000", "train.checkpoint_every=100000"),
                                     "--out", str(out)], "train step 3: val_loss", cache_dir)
    assert code == 130, stderr[-2000:]
    steps = sorted(int(p.name.split("-")[1]) for p in (out / "training_checkpoint").glob("step-*"))
    assert len(steps) == 1 and 3 <= steps[0] < 100000  # not a periodic checkpoint: the one Ctrl-C asked for
    assert (out / "training_checkpoint" / "LATEST").read_text().strip().endswith(f"{steps[0]:06d}")
    assert "continue with --resume" in stderr and "Traceback" not in stderr


def test_ctrl_c_during_ryzen_run_writes_the_finished_variants_report(tmp_path, cache_dir):
    out = tmp_path / "run"
    code, stderr = _interrupt_after(["run", "--plugins", "smoothing", *tiny_sets("train.max_steps=300"),
                                     "--out", str(out)], "optimized step 3: val_loss", cache_dir)
    assert code == 130, stderr[-2000:]
    report = (out / "report.md").read_text()
    assert "Interrupted while training `optimized`" in report
    runs = json.loads((out / "training_metrics_report.json").read_text())["runs"]
    assert list(runs) == ["baseline"] and runs["baseline"]["summary"]["steps"] == 300
    assert list((out / "optimized" / "training_checkpoint").glob("step-*"))
