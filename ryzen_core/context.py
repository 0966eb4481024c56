"""What a plugin is told about the run it is part of (Plugin API v1).

One RunContext per variant (`baseline`, `optimized`, `only-<plugin>`, or `train` for `ryzen
train`). Hooks receive it as `context`; plugin classes also get it as `self.context`. It
replaces reading the run directory's layout or rebuilding data: the prepared data, the
variant's directory and, once the baseline is trained, a handle to it are all here.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable


@dataclass
class BaselineHandle:
    """The baseline variant of this `ryzen run`, trained before the variants that compare against it.

    `model` is the live, final baseline model: read it, never train it. `checkpoint` is its final
    checkpoint directory (loadable with `load_weights`); `summary` its training summary."""

    model: Any
    checkpoint: Path | None
    summary: dict[str, Any] = field(default_factory=dict)


@dataclass
class RunContext:
    """The run as one variant sees it.

    - `config`: the validated RunConfig (read it; plugin settings come as `settings`).
    - `data`: the PreparedData every variant trains on (tokenizer, train/validation/test rows);
      None inside a validation worker, which only generates.
    - `run_dir`: the run directory; `variant_dir`: this variant's own directory, where its
      checkpoints, files and `on_train_end` output go (the same for `ryzen train`).
    - `variant`: its name; `plugins`: the plugins selected for it, in order.
    - `baseline`: the trained baseline, for variants trained after it; None otherwise.
    """

    config: Any
    data: Any
    run_dir: Path
    variant_dir: Path
    variant: str
    plugins: list[str] = field(default_factory=list)
    baseline: BaselineHandle | None = None
    recorder: Callable[[str], Callable[..., None]] | None = field(default=None, repr=False)

    @property
    def tokenizer(self):
        return None if self.data is None else self.data.tokenizer

    @property
    def cache_dir(self) -> Path:
        """Where plugins may keep what is worth reusing across runs (tuning decisions, say)."""
        return Path(self.config.data.cache_dir)

    def record(self, plugin: str, event: str, **data: Any) -> None:
        """Append an event to optimization_analysis.json on behalf of `plugin` (hooks also get a bound `record`)."""
        if self.recorder is not None:
            self.recorder(plugin)(event, **data)
