"""Plugins whose state lives on an instance, one per variant (Plugin API v1).

Register the class itself as the entry point (`name = "pkg.plugin:MyPlugin"`). The host makes
one instance per variant, with that variant's settings and RunContext, and calls its hook
methods (marked `@hookimpl`, as module functions are). State belongs on `self`: nothing leaks
from the baseline into the optimized variant, and resume restores it through `state_dict` /
`load_state_dict`, saved in every checkpoint.

One more instance, without settings or context, answers the process-wide hooks
(`ryzen_settings`, `register_commands`, `load_backend`), so `__init__` must stay cheap.
"""
from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict

from .hookspecs import hookimpl


class PluginSettings(BaseModel):
    """Base class of a plugin's settings: unknown keys are config errors, caught before any work."""

    model_config = ConfigDict(extra="forbid")


class Plugin:
    """Base class of a per-variant plugin. Set `Settings` to the settings class (or leave None)."""

    Settings: ClassVar[type[BaseModel] | None] = None

    reapply_on_load: bool = False
    """True when `on_model_load` changes what the model computes (swaps layers for quantized ones, adds
    sparsity), not only how it runs: the core then calls it again wherever it rebuilds this variant's model
    from its saved weights (validation workers, the variant's own fidelity reference), before loading them,
    so they measure the model as trained. A property may decide it from the settings."""

    def __init__(self, settings: BaseModel | None = None, context: Any = None):
        self.settings = settings if settings is not None or self.Settings is None else self.Settings()
        self.context = context

    @hookimpl
    def ryzen_settings(self):
        return self.Settings

    def state_dict(self) -> dict[str, Any]:
        """What must survive a resume, as JSON values (numbers, strings, lists, dicts). Default: nothing."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned, on a fresh instance for the resumed variant."""
