"""What hooks return, as types the host checks (Plugin API v1).

A hook returns one of these (or None). The host validates the result before using it, so a
plugin that returns the wrong thing is disabled with one line naming it and the hook, instead
of breaking the run somewhere later. Dicts in the shape plugins returned before API v1 are
still accepted and converted (`as_result`), so those plugins run unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .errors import PluginError


@dataclass
class ExportResult:
    """What `on_export` made: export directories by backend name, and optionally live backends.

    `backends` are objects already loaded in this process (used where validation runs inline);
    a worker process loads each export from disk through `load_backend` instead. `details` go
    into the inference report as they are (JSON values).
    """

    exports: dict[str, Path] = field(default_factory=dict)
    backends: dict[str, Any] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if not isinstance(self.exports, dict) or not all(isinstance(k, str) and isinstance(v, (str, Path))
                                                         for k, v in self.exports.items()):
            raise TypeError("ExportResult.exports must map backend names to paths")
        self.exports = {k: Path(v) for k, v in self.exports.items()}

    def report(self) -> dict[str, Any]:
        return {"exports": {k: str(v) for k, v in self.exports.items()}, **self.details}


@dataclass
class ReportSection:
    """Markdown that `on_train_end` adds to report.md under the plugin's name. Image links are
    relative to the directory the hook was given (`run_dir`)."""

    markdown: str
    files: dict[str, Path] = field(default_factory=dict)  # files the plugin wrote, by what they are

    def __post_init__(self):
        if not isinstance(self.markdown, str):
            raise TypeError("ReportSection.markdown must be a string")


@dataclass
class Adaptation:
    """Settings `on_epoch_end` changed: `{setting: new value}`. The host applies them to the plugin's
    settings (validated by its settings class), logs them with the step and records them."""

    changes: dict[str, Any]
    reason: str = ""

    def __post_init__(self):
        if not isinstance(self.changes, dict) or not all(isinstance(k, str) for k in self.changes):
            raise TypeError("Adaptation.changes must map setting names to values")


@dataclass
class InferencePath:
    """What `on_infer` returns: a generate function and, when it runs another model than the variant's
    own (a quantized copy, say), that model's `logits(input_ids)`, so perplexity is measured on what
    generates. Calling it generates, so plugins later in the fold can wrap it like a function."""

    generate: Callable[..., Any]
    logits: Callable[..., Any] | None = None

    def __call__(self, *args, **kwargs):
        return self.generate(*args, **kwargs)


def _legacy(hook: str, value: dict) -> Any:
    """The dicts hooks returned before API v1, converted."""
    if hook == "on_export":
        known = {"exports", "backends"}
        return ExportResult(value.get("exports") or {}, value.get("backends") or {},
                            {k: v for k, v in value.items() if k not in known})
    if hook == "on_train_end":
        markdown = value.get("report_markdown")
        return ReportSection(markdown) if isinstance(markdown, str) else None
    if hook == "on_epoch_end":
        return Adaptation(dict(value)) if value else None
    return value


EXPECTED = {"on_export": ExportResult, "on_train_end": ReportSection, "on_epoch_end": Adaptation}
CALLABLE = ("transform_forward", "on_infer")
IGNORED = ("on_model_load", "on_train_start", "on_train_batch_end", "on_train_finalize", "register_commands")


def as_result(hook: str, plugin: str, value: Any) -> Any:
    """`value` as the type `hook` returns, or a PluginError naming the plugin and what it returned."""
    if value is None or hook in IGNORED:
        return None
    if hook in EXPECTED:
        if isinstance(value, dict):
            try:
                value = _legacy(hook, value)
            except TypeError as exc:
                raise PluginError(f"plugin {plugin}: {hook} returned a dict that is not a valid result ({exc})") from None
        if value is None or isinstance(value, EXPECTED[hook]):
            return value
        raise PluginError(f"plugin {plugin}: {hook} must return {EXPECTED[hook].__name__} or None, "
                          f"not {type(value).__name__}")
    if hook in CALLABLE and not callable(value):
        raise PluginError(f"plugin {plugin}: {hook} must return a function or None, not {type(value).__name__}")
    return value
