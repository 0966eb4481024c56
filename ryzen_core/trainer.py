"""The training loop: AdamW with warmup and cosine decay, gradient accumulation and clipping,
optional bf16 autocast, NaN guard, evaluation with early stopping, checkpoints and resume,
and data parallelism over torch.distributed (gloo).

Plugins enter at six points: on_model_load (after the model is built), transform_forward
(the forward used for training steps), on_train_start (after the optimizer exists),
on_train_batch_end (after each optimizer step), on_epoch_end (after each evaluation; here an
"epoch" is one evaluation interval) and on_train_finalize (once, before the final checkpoint).
Evaluation always uses the plain fp32 forward, so a baseline run and an optimized run are
judged by the same yardstick.
"""
from __future__ import annotations

import contextlib
import logging
import math
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.distributed as dist

from .checkpoint import find_checkpoint, load_checkpoint, remove_orphans, save_checkpoint, set_aside
from .config import RunConfig
from .context import RunContext
from .data import BatchSampler, PreparedData
from .errors import TrainingError
from .forward import Forward, reference_forward
from .metrics import MetricsCollector
from .models.build import build_model
from .errors import PluginError
from .plugins import Event, PluginHost, describe_error
from .progress import Progress, progress

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    model: torch.nn.Module
    metrics: MetricsCollector
    stopped_because: str
    run_dir: Path
    plugins: list[str]
    disabled: dict[str, str] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        return dict(self.metrics.summary(), stopped_because=self.stopped_because, plugins=self.plugins,
                    disabled_plugins=self.disabled)


def lr_factor(step: int, warmup: int, total: int | None, min_ratio: float) -> float:
    """Linear warmup, then cosine decay to min_ratio at `total` (constant when the budget is only time)."""
    if step < warmup:
        return (step + 1) / warmup
    if total is None or total <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / (total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_optimizer(model: torch.nn.Module, cfg) -> torch.optim.AdamW:
    # Weight decay on matrices only; decaying norms and biases hurts small models.
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))


class Trainer:
    def __init__(self, config: RunConfig, host: PluginHost, plugins: Sequence[str], run_dir: Path,
                 data: PreparedData, label: str = "train", context: RunContext | None = None):
        self.config, self.host, self.run_dir, self.data, self.label = config, host, Path(run_dir), data, label
        self.plugins = list(plugins)
        self.context = context or RunContext(config, data, self.run_dir, self.run_dir, label, self.plugins,
                                             recorder=host.recorder)
        host.begin_variant(self.context, self.plugins)
        self.tc = config.train
        self.world_size = dist.get_world_size() if dist.is_initialized() else 1
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        if self.tc.threads:
            torch.set_num_threads(self.tc.threads)
        torch.manual_seed(self.tc.seed)  # same init for the baseline and every optimized run
        self.model = build_model(config.model, data.tokenizer.vocab_size)
        self.host.call_each("on_model_load", self.plugins, model=self.model, tokenizer=data.tokenizer, config=config,
                            context=self.context)
        self.reference = reference_forward(self.model)
        self.forward = self._fold_forward()
        self.optimizer = build_optimizer(self.model, self.tc)
        self.seq_len = data.train.shape[1] - 1
        self.tokens_per_step = self.tc.batch_size * self.tc.grad_accum * self.seq_len * self.world_size
        self.total_steps = self._total_steps()
        # Before the schedule exists: a learning rate a plugin sets here is the peak the schedule scales.
        self.host.call_each("on_train_start", self.active_plugins, model=self.model, optimizer=self.optimizer,
                            config=config, context=self.context)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, self.tc.warmup_steps, self.total_steps, self.tc.min_lr_ratio))
        self.sampler = BatchSampler(len(data.train), self.tc.batch_size, self.tc.seed, self.rank, self.world_size)
        self.batches_per_epoch = len(self.sampler.batches_for_epoch(0))
        if self.batches_per_epoch == 0:
            raise TrainingError(f"train split has {len(data.train)} sequences, fewer than one global batch "
                                f"({self.tc.batch_size * self.world_size}); lower train.batch_size or add data")
        self.metrics = MetricsCollector()
        self.step, self.micro_batches, self.elapsed = 0, 0, 0.0
        self.best_val, self.evals_since_best, self.bad_in_row = math.inf, 0, 0
        self._epoch_cache: tuple[int, list[torch.Tensor]] | None = None
        self.autocast = self.tc.precision == "bf16"  # 'auto' leaves the choice to plugins (config.py)

    @property
    def active_plugins(self) -> list[str]:
        return self.host.active(self.plugins)

    def _fold_forward(self) -> Forward:
        """Fold transform_forward over the active plugins, keeping each plugin's stage for blame."""
        forward, self.stages = self.reference, []
        for name in self.active_plugins:
            wrapped = self.host.fold("transform_forward", [name], "forward", forward, model=self.model,
                                     config=self.config, context=self.context)
            if wrapped is not forward:
                self.stages.append((name, wrapped))
            forward = wrapped
        return forward

    def _total_steps(self) -> int | None:
        budgets = []
        if self.tc.max_steps:
            budgets.append(self.tc.max_steps)
        if self.tc.max_tokens:
            budgets.append(math.ceil(self.tc.max_tokens / self.tokens_per_step))
        return min(budgets) if budgets else None

    # -- data ------------------------------------------------------------------------
    def _next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        # The position in the data follows from the micro-batch count alone, so resume needs no sampler state.
        epoch, index = divmod(self.micro_batches, self.batches_per_epoch)
        if self._epoch_cache is None or self._epoch_cache[0] != epoch:
            self._epoch_cache = (epoch, self.sampler.batches_for_epoch(epoch))
        rows = self.data.train[self._epoch_cache[1][index]]
        self.micro_batches += 1
        return rows[:, :-1], rows[:, 1:]

    # -- one optimizer step ------------------------------------------------------------
    def _run_forward(self, forward: Forward, x, y):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.autocast):
            return forward(x, y)

    def _blame(self, x, y) -> str | None:
        """The first plugin whose stage of the forward makes this batch raise or go non-finite, if any."""
        with torch.no_grad():
            for name, stage in self.stages:
                try:
                    if not torch.isfinite(self._run_forward(stage, x, y).loss):
                        return name
                except Exception:
                    return name
        return None

    def _gradients_finite(self, forward: Forward, batches) -> bool:
        self.optimizer.zero_grad(set_to_none=True)
        try:
            for x, y in batches:
                self._run_forward(forward, x, y).loss.backward()
        except Exception:
            return False
        return all(bool(torch.isfinite(p.grad).all()) for p in self.model.parameters() if p.grad is not None)

    def _blame_gradients(self, batches) -> str | None:
        """The first plugin whose stage of the forward gives non-finite gradients on these batches where
        the plain forward does not (a finite loss can still have NaN gradients)."""
        if self.world_size > 1 or not self.stages or not self._gradients_finite(self.reference, batches):
            return None  # ranks would judge different batches; or the model itself is at fault
        return next((name for name, stage in self.stages if not self._gradients_finite(stage, batches)), None)

    def _disable_and_refold(self, name: str, reason: str) -> None:
        self.host.disable(name, "transform_forward", reason)
        self.forward = self._fold_forward()

    def train_step(self) -> None:
        start = time.perf_counter()
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum, finite, batches = 0.0, True, []
        for _ in range(self.tc.grad_accum):
            x, y = self._next_batch()
            batches.append((x, y))
            try:
                loss = self._run_forward(self.forward, x, y).loss
            except Exception as exc:
                culprit = self._blame(x, y)
                if culprit is None:
                    raise
                self._disable_and_refold(culprit, f"forward raised {describe_error(exc)}")
                loss = self._run_forward(self.forward, x, y).loss
            if not torch.isfinite(loss):
                culprit = self._blame(x, y)
                if culprit is not None:
                    self._disable_and_refold(culprit, "forward produced a non-finite loss")
                finite = False
                break
            (loss / self.tc.grad_accum).backward()
            loss_sum += loss.item()
        if finite:
            self._all_reduce_grads()
            max_norm = self.tc.grad_clip if self.tc.grad_clip > 0 else math.inf
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm))
            finite = math.isfinite(grad_norm)
            culprit = None if finite else self._blame_gradients(batches)
            if culprit is not None:
                self._disable_and_refold(culprit, "forward produced non-finite gradients")
        loss_value = self._mean_across_ranks(loss_sum / self.tc.grad_accum) if finite else math.nan
        if finite:
            self.optimizer.step()
            self.bad_in_row = 0
        else:
            grad_norm = math.nan
            self.optimizer.zero_grad(set_to_none=True)
            self.bad_in_row += 1
            log.warning("%s step %d: non-finite loss or gradients, step skipped (%d in a row)",
                        self.label, self.step + 1, self.bad_in_row)
        lr = self.optimizer.param_groups[0]["lr"]
        self.scheduler.step()
        self.step += 1
        step_time = time.perf_counter() - start
        self.elapsed += step_time
        self.metrics.log_step(self.step, self.step * self.tokens_per_step, loss_value, lr, grad_norm, step_time,
                              self.tokens_per_step, skipped=not finite)
        if self.bad_in_row >= self.tc.max_bad_steps:
            raise TrainingError(
                f"{self.label}: stopped after {self.bad_in_row} consecutive steps with non-finite loss or gradients "
                f"(last at step {self.step}); lower train.lr or raise train.max_bad_steps")

    def _all_reduce_grads(self) -> None:
        # Averaging gradients by hand (one flat all-reduce) instead of wrapping the model in DDP keeps
        # plugin-wrapped forwards untouched; the result equals one process on the whole global batch.
        if self.world_size == 1:
            return
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        flat = torch._utils._flatten_dense_tensors(grads)
        dist.all_reduce(flat)
        flat /= self.world_size
        for g, synced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
            g.copy_(synced)

    def _mean_across_ranks(self, value: float) -> float:
        if self.world_size == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(t)
        return float(t.item() / self.world_size)

    # -- evaluation ---------------------------------------------------------------------
    def evaluate(self, split: torch.Tensor | None = None, max_batches: int | None = None,
                 desc: str | None = None) -> float:
        """Mean next-token loss of the plain fp32 model over the first batches of a split (validation by default);
        with `desc`, progress is shown under that name."""
        losses = self.batch_losses(split, max_batches, desc)
        return sum(loss * rows for loss, rows in losses) / sum(rows for _, rows in losses)

    @torch.no_grad()
    def batch_losses(self, split: torch.Tensor | None = None, max_batches: int | None = None,
                     desc: str | None = None) -> list[tuple[float, int]]:
        """(mean loss, rows) of each of the first batches of a split: the same batches for every variant,
        so two models' losses pair batch by batch. A batch is the global batch (train.batch_size rows per
        process), and every process evaluates all of it, so the figures do not depend on the process count."""
        split = self.data.validation if split is None else split
        max_batches = max_batches or self.tc.eval_batches
        size = self.tc.batch_size * self.world_size
        self.model.eval()
        losses = []
        starts = range(0, min(len(split), max_batches * size), size)
        for i in (progress(starts, desc, unit="batch") if desc and self.rank == 0 else starts):
            rows = split[i: i + size]
            losses.append((self.reference(rows[:, :-1], rows[:, 1:]).loss.item(), len(rows)))
        self.model.train()
        return losses

    def _evaluate_and_adapt(self) -> bool:
        """Evaluate, let plugins adapt; return True when early stopping says stop."""
        val_loss = self.evaluate()
        row = self.metrics.log_eval(self.step, self.step * self.tokens_per_step, val_loss, self.elapsed)
        epoch = len(self.metrics.evals)
        adaptations = self.host.call_each("on_epoch_end", self.active_plugins, epoch=epoch, metrics=dict(row),
                                          model=self.model, config=self.config, context=self.context)
        for name, adaptation in adaptations.items():
            if adaptation is None:
                continue
            try:
                change = self.host.apply_adaptation(name, adaptation)
            except (TypeError, PluginError) as exc:  # it would break the next checkpoint: the plugin goes
                self.host.disable(name, "on_epoch_end", f"returned {exc}")
                continue
            self.metrics.log_adaptation(self.step, name, change)
            self.host.recorder(name, "on_epoch_end")("adapted", step=self.step, changes=change)
        log.info("%s step %d: val_loss %.4f (ppl %.1f)", self.label, self.step, val_loss, row["val_perplexity"])
        if val_loss < self.best_val - 1e-4:
            self.best_val, self.evals_since_best = val_loss, 0
        else:
            self.evals_since_best += 1
        return bool(self.tc.early_stop_patience and self.evals_since_best >= self.tc.early_stop_patience)

    # -- checkpoints ----------------------------------------------------------------------
    def _trainer_state(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "torch_rng": torch.get_rng_state()}

    def _state(self) -> dict[str, Any]:
        return {
            "label": self.label, "step": self.step, "micro_batches": self.micro_batches, "elapsed": self.elapsed,
            "best_val": self.best_val if math.isfinite(self.best_val) else None,
            "evals_since_best": self.evals_since_best, "metrics": self.metrics.state(),
            "disabled": self.host.disabled, "events": [e.__dict__ for e in self.host.events],
            "plugin_settings": {n: s.model_dump(mode="json") for n, s in self.host.settings.items() if s is not None},
            "plugin_state": self.host.plugin_state(),
        }

    def save(self) -> None:
        if self.rank == 0:
            save_checkpoint(self.run_dir, self.step, self.model, self._trainer_state(), self._state())
        if self.world_size > 1:
            dist.barrier()

    def resume(self) -> bool:
        point = find_checkpoint(self.run_dir)
        if point is None:
            return False
        path = point.path
        if self.rank == 0:
            set_aside(point)  # checkpoints passed over are kept under another name, never overwritten
        trainer_state, state = load_checkpoint(path, self.model)
        self.optimizer.load_state_dict(trainer_state["optimizer"])
        self.scheduler.load_state_dict(trainer_state["scheduler"])
        torch.set_rng_state(trainer_state["torch_rng"])
        self.step, self.micro_batches, self.elapsed = state["step"], state["micro_batches"], state["elapsed"]
        self.best_val = state["best_val"] if state["best_val"] is not None else math.inf
        self.evals_since_best = state["evals_since_best"]
        self.metrics = MetricsCollector.from_state(state["metrics"])
        self.host.events = [Event(**e) for e in state["events"]]
        for name, reason in state["disabled"].items():
            self.host.disabled[name] = reason
        for name, values in state["plugin_settings"].items():
            if self.host.settings.get(name) is not None:
                self.host.settings[name] = type(self.host.settings[name]).model_validate(values)
                if (inst := self.host.instance(name)) is not None:
                    inst.settings = self.host.settings[name]
        self.host.load_plugin_state(state.get("plugin_state") or {})
        self.forward = self._fold_forward()
        log.info("%s: resumed from %s at step %d", self.label, path, self.step)
        return True

    # -- the loop ----------------------------------------------------------------------
    def _finalize(self) -> None:
        """Let plugins settle the weights (e.g. swap in an EMA); re-measure validation loss if one did."""
        finalizers = [name for name in self.active_plugins if self.host.implements("on_train_finalize", name)]
        self.host.call_each("on_train_finalize", finalizers, model=self.model, config=self.config, context=self.context)
        if finalizers:
            val_loss = self.evaluate()
            self.metrics.log_eval(self.step, self.step * self.tokens_per_step, val_loss, self.elapsed)
            log.info("%s: val_loss %.4f after on_train_finalize (%s)", self.label, val_loss, ", ".join(finalizers))

    def _done(self) -> str | None:
        if self.total_steps is not None and self.step >= self.total_steps:
            return "budget (steps/tokens)"
        if self.tc.max_seconds is not None and self.elapsed >= self.tc.max_seconds:
            return "budget (seconds)"
        return None

    @contextlib.contextmanager
    def _stop_at_step_boundary_on_ctrl_c(self):
        """The first Ctrl-C finishes the step under way and checkpoints it (fit then raises KeyboardInterrupt, so
        --resume continues from there); a second stops at once. One process only: ranks would stop at
        different steps and wait for each other at the checkpoint."""
        if self.world_size > 1 or threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = signal.getsignal(signal.SIGINT)

        def first_interrupt(signum, frame):
            self.interrupted = True
            signal.signal(signal.SIGINT, previous)
            log.warning("%s: interrupted; finishing step %d and saving a checkpoint (Ctrl-C again stops at once)",
                        self.label, self.step + 1)

        signal.signal(signal.SIGINT, first_interrupt)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)

    def fit(self, resume: bool = False) -> TrainResult:
        if self.rank == 0:
            remove_orphans(self.run_dir)
        if resume:
            self.resume()
        stopped = self._done()
        trained = stopped is None  # a resumed run that had already finished is final as it stands
        self.interrupted = False
        with Progress(self.label, self.total_steps, enabled=self.rank == 0, initial=self.step) as bar, \
                self._stop_at_step_boundary_on_ctrl_c():
            while stopped is None:
                self.train_step()
                row = self.metrics.steps[-1]
                self.host.call_each("on_train_batch_end", self.active_plugins, step=self.step, model=self.model,
                                    optimizer=self.optimizer, metrics=dict(row), config=self.config,
                                    context=self.context)
                bar.update(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}", tok_s=f"{row['tokens_per_s']:.0f}")
                stopped = self._done()
                if self.step % self.tc.eval_every == 0 or stopped:
                    if self._evaluate_and_adapt() and stopped is None:
                        stopped = f"early stopping (no improvement in {self.tc.early_stop_patience} evaluations)"
                if self.step % self.tc.checkpoint_every == 0 and stopped is None or self.interrupted:
                    self.save()
                if self.interrupted:
                    log.warning("%s: checkpoint of step %d saved; continue with --resume", self.label, self.step)
                    raise KeyboardInterrupt
        if trained:
            self._finalize()
            self.save()  # the final checkpoint holds the finalized weights every other artifact comes from
        return TrainResult(self.model, self.metrics, stopped, self.run_dir, self.plugins, dict(self.host.disabled))
