"""Plugin discovery (stevedore), registration and calling (pluggy).

stevedore finds and imports the entry points of the group `ryzen.plugins`;
pluggy validates their hooks. Every hook is called through one path here (`_call`),
plugin by plugin in the user's `--plugins` order, because pluggy neither orders
implementations by our list nor chains results; so pluggy's ordering options
(tryfirst, trylast, wrappers) are refused at registration rather than ignored.

An entry point names a module of hook functions or a `Plugin` subclass; a class is
instantiated once per variant (`begin_variant`) and its hooks run on that instance.
"""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import traceback
from dataclasses import dataclass, field
from pathlib import PurePath
from typing import Any, Callable, Iterable, Sequence

import pluggy
from pydantic import BaseModel

from . import hookspecs
from .errors import PluginError
from .plugin_class import Plugin
from .results import Adaptation, as_result

ENTRY_POINT_GROUP = "ryzen.plugins"
# Comma-separated names of installed plugins to load automatically; empty loads none.
AUTOLOAD_ENV = "RYZEN_LOAD_PLUGINS"

log = logging.getLogger(__name__)


@dataclass
class PluginRecord:
    """What `ryzen plugins` shows for one entry point."""

    name: str
    distribution: str | None = None
    version: str | None = None
    module: str | None = None
    status: str = "loaded"  # loaded | failed | disabled
    error: str | None = None
    hooks: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items()}


@dataclass
class Event:
    """One thing a plugin (or the host on its behalf) recorded during a run."""

    plugin: str
    hook: str
    event: str
    data: dict[str, Any]


def create_plugin_manager() -> pluggy.PluginManager:
    """A fresh manager with Ryzen's hook specs; built on demand so tests and embedders get their own."""
    pm = pluggy.PluginManager("ryzen")
    pm.add_hookspecs(hookspecs)
    return pm


def describe_error(exc: BaseException) -> str:
    lines = traceback.format_exception_only(type(exc), exc)
    return lines[-1].strip() if lines else repr(exc)


def json_value(value: Any, where: str = "value") -> Any:
    """`value` in JSON types, for checkpoints and reports: numpy/torch scalars and arrays become
    numbers and lists, paths strings; anything else is a TypeError naming where it was."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, dict):
        bad = next((k for k in value if not isinstance(k, (str, int)) or isinstance(k, bool)), None)
        if bad is not None:
            raise TypeError(f"a {type(bad).__name__} key in {where}, which is not JSON")
        return {str(k): json_value(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_value(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, PurePath):
        return str(value)
    if type(value).__module__.split(".")[0] in ("numpy", "torch") and hasattr(value, "tolist"):
        return json_value(value.tolist(), where)
    raise TypeError(f"{type(value).__name__} at {where}, which is not JSON (use numbers, strings, lists, dicts)")


class PluginHost:
    """The plugins of one process: what was found, what loaded, and the calls into them."""

    def __init__(self, pm: pluggy.PluginManager | None = None):
        self.pm = pm or create_plugin_manager()
        self.records: dict[str, PluginRecord] = {}
        self.settings: dict[str, BaseModel | None] = {}
        self.disabled: dict[str, str] = {}
        self.events: list[Event] = []
        self.classes: dict[str, type[Plugin]] = {}  # plugins registered as a class: one instance per variant
        self.instances: dict[str, dict[str, Plugin]] = {}  # variant -> plugin name -> instance
        self.contexts: dict[str, Any] = {}  # variant -> its RunContext
        self.variant: str | None = None  # the variant whose instances hooks run on
        self.hook: str | None = None  # the hook being called, for record()
        self.hook_timeout_s: float | None = None  # train.hook_timeout_s; see _time_limit

    # -- loading -----------------------------------------------------------------
    def load_installed(self, names: Iterable[str] | None = None) -> None:
        """Import the entry points of `ryzen.plugins` (all, or only `names`), recording failures."""
        from stevedore import ExtensionManager, NamedExtensionManager

        failures: list[tuple[Any, BaseException]] = []

        def on_failure(_manager, entry_point, exc):
            failures.append((entry_point, exc))

        if names is None:
            manager = ExtensionManager(ENTRY_POINT_GROUP, on_load_failure_callback=on_failure)
        else:
            manager = NamedExtensionManager(
                ENTRY_POINT_GROUP, names=list(names), name_order=True,
                on_load_failure_callback=on_failure,
            )
        for ext in manager:
            if ext.name in self.records:
                continue
            record = self._record_for(ext.name, ext.entry_point)
            self.register(ext.plugin, ext.name, record)
        for entry_point, exc in failures:
            if entry_point.name in self.records:
                continue
            record = self._record_for(entry_point.name, entry_point)
            record.status, record.error = "failed", describe_error(exc)
            self.records[entry_point.name] = record
            log.debug("plugin %s failed to load: %s", entry_point.name, record.error)

    @staticmethod
    def _record_for(name: str, entry_point) -> PluginRecord:
        from importlib.metadata import entry_points

        # stevedore's cached entry points carry no distribution; importlib.metadata's do.
        value = getattr(entry_point, "value", None)
        dist = next((ep.dist for ep in entry_points(group=ENTRY_POINT_GROUP)
                     if ep.name == name and ep.value == value), None)
        return PluginRecord(name=name, distribution=getattr(dist, "name", None),
                            version=getattr(dist, "version", None), module=value)

    def register(self, plugin: object, name: str, record: PluginRecord | None = None) -> None:
        """Register a plugin (a module, an instance, or a `Plugin` subclass) under `name` and validate its hooks."""
        record = record or PluginRecord(name=name, module=getattr(plugin, "__name__", type(plugin).__name__))
        cls = plugin if isinstance(plugin, type) else None
        try:
            if cls is not None:
                if not issubclass(cls, Plugin):
                    raise PluginError(f"{cls.__name__} is a class but not a ryzen_core.Plugin subclass")
                plugin = cls()  # answers the process-wide hooks; each variant gets its own instance
            self.pm.register(plugin, name=name)
            # A hook implementation whose name matches no spec is a typo, not an extension.
            self.pm.check_pending()
            self._refuse_ordering_options(name)
        except Exception as exc:  # a plugin with bad hooks must not take the others down
            if self.pm.is_registered(plugin):
                self.pm.unregister(plugin)
            record.status, record.error = "failed", describe_error(exc)
        else:
            if cls is not None:
                self.classes[name] = cls
            record.hooks = sorted(caller.name for caller in self.pm.get_hookcallers(plugin) or [])
            record.status = "loaded"
        self.records[name] = record

    def _refuse_ordering_options(self, name: str) -> None:
        for caller in self.pm.get_hookcallers(self.pm.get_plugin(name)) or []:
            for impl in caller.get_hookimpls():
                if impl.plugin_name != name:
                    continue
                used = [o for o in ("hookwrapper", "wrapper", "tryfirst", "trylast") if getattr(impl, o, False)]
                if used:
                    raise PluginError(f"@hookimpl({used[0]}=True) on {caller.name} is not supported: Ryzen calls "
                                      "hooks one plugin at a time in --plugins order (docs/plugins.md)")

    def unregister(self, name: str) -> None:
        plugin = self.pm.get_plugin(name)
        if plugin is not None:
            self.pm.unregister(plugin)
        self.records.pop(name, None)
        self.settings.pop(name, None)
        self.classes.pop(name, None)

    def require(self, names: Sequence[str]) -> None:
        """Fail with one line if any plugin the user asked for is missing or broken."""
        for name in names:
            record = self.records.get(name)
            if record is None:
                available = ", ".join(sorted(self.loaded_names())) or "none"
                raise PluginError(f"plugin '{name}' is not installed (installed: {available})")
            if record.status == "failed":
                raise PluginError(f"plugin '{name}' failed to load: {record.error}")

    def loaded_names(self) -> list[str]:
        return [n for n, r in self.records.items() if r.status == "loaded"]

    # -- settings ----------------------------------------------------------------
    def settings_models(self) -> dict[str, type[BaseModel]]:
        """Each loaded plugin's settings class, by plugin name. A plugin whose ryzen_settings raises is
        unregistered and recorded as failed: ignored unless selected, when `require` names it."""
        models = {}
        for impl in list(self.pm.hook.ryzen_settings.get_hookimpls()):
            try:
                model = self._call("ryzen_settings", impl.plugin_name, {})
                if model is not None and not (isinstance(model, type) and issubclass(model, BaseModel)):
                    raise PluginError(f"returned {type(model).__name__}, not a pydantic model class")
            except (Exception, SystemExit) as exc:
                self.pm.unregister(self.pm.get_plugin(impl.plugin_name))
                record = self.records.setdefault(impl.plugin_name, PluginRecord(impl.plugin_name))
                record.status, record.error = "failed", f"ryzen_settings raised {describe_error(exc)}"
                continue
            if model is not None:
                models[impl.plugin_name] = model
        return models

    # -- one instance per variant ------------------------------------------------------
    def begin_variant(self, context, names: Sequence[str]) -> None:
        """Make this variant's instance of each named class plugin (with its settings and context) and
        run hooks on them from now on. A module plugin needs nothing: its state is its own business."""
        self.contexts[context.variant] = context
        self.instances[context.variant] = {
            name: self.classes[name](self.settings.get(name), context) for name in names if name in self.classes}
        self.variant = context.variant

    def use_variant(self, variant: str | None) -> None:
        """Run hooks on `variant`'s instances (made earlier by begin_variant), e.g. to validate it."""
        self.variant = variant if variant in self.contexts else None

    def instance(self, name: str) -> Plugin | None:
        return self.instances.get(self.variant, {}).get(name)

    def plugin_state(self) -> dict[str, Any]:
        """Each current instance's state_dict, in JSON, for the checkpoint."""
        states = {}
        for name, inst in self.instances.get(self.variant, {}).items():
            try:
                states[name] = json_value(inst.state_dict(), f"{name}.state_dict()")
            except Exception as exc:  # it would break the checkpoint; the plugin goes like any failing one
                self.disable(name, "state_dict", describe_error(exc))
        return states

    def load_plugin_state(self, states: dict[str, Any]) -> None:
        for name, state in states.items():
            inst = self.instance(name)
            if inst is None or name in self.disabled:
                continue
            try:
                inst.load_state_dict(state)
            except Exception as exc:
                self.disable(name, "load_state_dict", describe_error(exc))

    def apply_adaptation(self, name: str, adaptation: Adaptation) -> dict[str, Any]:
        """Validate `adaptation` against the plugin's settings class and make it the current settings;
        return the changes as JSON for the log."""
        changes = json_value(adaptation.changes, "its result")
        current = self.settings.get(name)
        if current is None:  # nothing to apply: the changes are the plugin's own state, logged as they are
            return changes
        try:
            updated = type(current).model_validate(dict(current.model_dump(), **changes))
        except Exception as exc:
            raise PluginError(f"plugin {name}: its Adaptation does not fit its settings ({describe_error(exc)})") from None
        self.settings[name] = updated
        if (inst := self.instance(name)) is not None:
            inst.settings = updated
        return changes

    # -- calling -----------------------------------------------------------------
    def recorder(self, plugin: str, hook: str | None = None) -> Callable[..., None]:
        """record(event, **data) on behalf of `plugin`, during `hook` (default: the hook being called)."""
        def record(event: str, **data: Any) -> None:
            try:
                data = json_value(data, "data")
            except TypeError as exc:  # raised inside the plugin's hook, so the fallback disables it
                raise PluginError(f"plugin {plugin} recorded {str(event)[:60]!r} with {exc}") from None
            self.events.append(Event(plugin, hook or self.hook or "plugin", event, data))

        return record

    def _impl(self, hook: str, plugin_name: str):
        for impl in getattr(self.pm.hook, hook).get_hookimpls():
            if impl.plugin_name == plugin_name:
                return impl
        return None

    def implements(self, hook: str, plugin_name: str) -> bool:
        return self._impl(hook, plugin_name) is not None

    def _call(self, hook: str, plugin_name: str, kwargs: dict[str, Any]):
        """The one way a hook is called: on the variant's instance where the plugin is a class, with the
        arguments the implementation names, its result checked against the hook's result type."""
        impl = self._impl(hook, plugin_name)
        if impl is None:
            return None
        inst = self.instance(plugin_name)
        function = getattr(inst, impl.function.__name__) if inst is not None else impl.function
        kwargs = dict(kwargs, settings=self.settings.get(plugin_name), record=self.recorder(plugin_name, hook))
        outer, self.hook = self.hook, hook
        try:
            with self._time_limit(plugin_name, hook, nested=outer is not None):
                # pluggy lets implementations take any subset of the spec's arguments.
                result = function(**{arg: kwargs.get(arg) for arg in impl.argnames})
        finally:
            self.hook = outer
        return as_result(hook, plugin_name, result)

    @contextlib.contextmanager
    def _time_limit(self, plugin: str, hook: str, nested: bool):
        """A hook call that runs past hook_timeout_s raises PluginError inside it (SIGALRM; main thread only),
        so a hung plugin is disabled like a failing one instead of hanging the run."""
        limit = self.hook_timeout_s
        if limit is None or nested or threading.current_thread() is not threading.main_thread():
            yield
            return

        def expired(signum, frame):
            raise PluginError(f"plugin {plugin}: {hook} ran past train.hook_timeout_s ({limit:g} s)")

        previous = signal.signal(signal.SIGALRM, expired)
        signal.setitimer(signal.ITIMER_REAL, limit)
        try:
            yield
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)

    def first(self, hook: str, names: Sequence[str], **kwargs) -> Any:
        """The first non-None result of `hook` over `names` in order (load_backend: whose export is it?)."""
        for name in names:
            result = self._call(hook, name, kwargs)
            if result is not None:
                return result
        return None

    def active(self, names: Sequence[str]) -> list[str]:
        return [n for n in names if n not in self.disabled]

    def disable(self, name: str, hook: str, reason: str) -> None:
        """Take a plugin out of the rest of the run and say why (the report shows it)."""
        self.disabled[name] = f"{hook}: {reason}"
        self.events.append(Event(name, hook, "disabled", {"reason": reason}))
        log.warning("plugin %s disabled during %s: %s", name, hook, reason)

    def call_each(self, hook: str, names: Sequence[str], fallback: bool = True, **kwargs) -> dict[str, Any]:
        """Call `hook` on each named plugin in order; a plugin that raises is disabled when `fallback`."""
        results = {}
        for name in self.active(names):
            try:
                results[name] = self._call(hook, name, kwargs)
            except (Exception, SystemExit) as exc:  # sys.exit in a plugin is its failure, not the run's end
                if not fallback:
                    raise
                self.disable(name, hook, describe_error(exc))
        return results

    def fold(self, hook: str, names: Sequence[str], value_arg: str, value: Any, fallback: bool = True, **kwargs) -> Any:
        """Thread `value` through each named plugin in order: the next sees the previous one's result."""
        for name in self.active(names):
            try:
                result = self._call(hook, name, dict(kwargs, **{value_arg: value}))
            except (Exception, SystemExit) as exc:
                if not fallback:
                    raise
                self.disable(name, hook, describe_error(exc))
                continue
            if result is not None:
                value = result
        return value


def autoload_names() -> list[str] | None:
    """Names from RYZEN_LOAD_PLUGINS, or None (load every installed plugin) when it is unset."""
    value = os.environ.get(AUTOLOAD_ENV)
    if value is None:
        return None
    return [n.strip() for n in value.split(",") if n.strip()]


def load_plugins(selected: Sequence[str] = (), autoload: bool = True) -> PluginHost:
    """Load the installed plugins (subject to RYZEN_LOAD_PLUGINS) plus every selected one."""
    host = PluginHost()
    names = autoload_names() if autoload else []
    if names is None:
        host.load_installed()
    elif names or selected:
        host.load_installed(list(dict.fromkeys([*names, *selected])))
    else:
        return host
    missing = [n for n in selected if n not in host.records]
    if missing:
        # A second look for names the autoload filter kept out.
        host.load_installed(missing)
    return host
