"""The tuning decision for one model and batch shape: cached, measured now, or taken from settings alone.

Precision and threads come from the `train` section, which the trainer reads too (one owner per
decision); the kernel's own settings hold the other knobs and how to measure.
"""
from __future__ import annotations

import logging
from typing import Any, Callable

import torch

from ryzen_core import CpuFeatures

from .cache import DecisionCache, cache_key, library_versions, model_shape
from .strategy import REFERENCE, Strategy
from .tune import DECISION_RULE, Tuner, describe_trial, plan

log = logging.getLogger(__name__)

# The settings a decision depends on: any change makes a new cache key, so the next run tunes again.
TUNING_SETTINGS = {"attention", "optimizer", "compile", "denormals", "tune_rounds", "tune_steps", "loss_tolerance",
                   "mask_features"}


def untuned_strategy(settings, cpu: CpuFeatures, train) -> Strategy:
    """Without measuring: the fixed choices, the reference for the rest, bf16 where `auto` precision
    meets native bf16 (as the trainer's own `auto` does)."""
    start, trials, _ = plan(settings, cpu, train)
    if dict(trials).get("precision") == "bf16":
        start = start.with_knob("precision", "bf16")
    return start


def decide(model: torch.nn.Module, config, settings, cpu: CpuFeatures,
           log_line: Callable[[str], None] = log.info) -> tuple[dict[str, Any], str]:
    """(decision, source): source is 'cache', 'measured' or 'settings'."""
    train = config.train
    start, trials, not_tried = plan(settings, cpu, train)
    base = {"cpu": cpu.signature(), "not_tried": not_tried}
    if not settings.autotune or not trials:
        chosen = untuned_strategy(settings, cpu, train) if not settings.autotune else start
        return dict(base, chosen=chosen.as_dict(), chosen_description=chosen.describe(), trials=[]), "settings"
    shape = model_shape(model, train.batch_size, config.data.seq_len)
    versions = library_versions()
    tuning = dict(settings.model_dump(include=TUNING_SETTINGS), precision=train.precision, threads=train.threads,
                  decision_rule=DECISION_RULE)
    key = cache_key(cpu.signature(), shape, versions, tuning)
    cache = DecisionCache(config.data.cache_dir / "kernel")

    def tuner() -> Tuner:
        return Tuner(model, train, train.batch_size, config.data.seq_len, settings, log_line)

    cached = None if settings.retune else cached_choice(cache, key)
    if cached is not None:
        chosen = Strategy(**cached["chosen"])
        reference = REFERENCE.with_knob("threads", chosen.threads)
        if settings.confirm_cached and chosen != reference:
            # The trials are from the run that tuned; the speedup this run reports is measured now.
            cached["confirmation"] = dict(tuner().trial(reference, chosen), measured="in this run")
            log_line(f"kernel tune: cached choice ({chosen.describe()}) vs reference, measured now: "
                     f"{describe_trial(cached['confirmation'])}")
        return cached, "cache"
    log_line(f"kernel tune: timing {len(trials)} choices on {shape['model_class']} "
             f"({shape['parameters']:,} parameters), batch {shape['batch_size']} x {shape['seq_len']}")
    decision = dict(base, shape=shape, versions=versions, **tuner().run(start, trials))
    path = cache.store(key, decision)
    return dict(decision, key=key, cache_file=str(path)), "measured"


def cached_choice(cache: DecisionCache, key: str) -> dict[str, Any] | None:
    """The cached decision for `key` if its choice is one this version understands."""
    cached = cache.load(key)
    if cached is None:
        return None
    try:
        Strategy(**cached["chosen"])
    except TypeError:  # edited by hand or written by another version: measure again
        log.warning("ignoring tuning cache %s: its choice has unknown fields", cache.path(key))
        return None
    return dict(cached, cache_file=str(cache.path(key)))


def decide_once(model, config, settings, cpu: CpuFeatures) -> tuple[dict[str, Any], str]:
    """Under DDP every rank must run the same strategy: rank 0 decides (tunes alone, so the timings
    are not disturbed by the other ranks) and sends its decision to the rest."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return decide(model, config, settings, cpu)
    box = [decide(model, config, settings, cpu) if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)  # between our own processes, not untrusted data
    return box[0]
