"""Run configuration: pydantic models with defaults for everything, loaded from YAML/JSON and --set.

Each installed plugin may add a section named after it; its schema comes from the
plugin's `ryzen_settings` hook. Every mistake is caught here, before any work starts.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any, Literal, Mapping, Sequence

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import ConfigError

# Bounds far above anything trained on a CPU, low enough that a typo fails here, in one line,
# instead of as an overflow, a segfault or an allocation that never ends.
MAX_WIDTH = 1 << 16          # d_model, d_ff, heads, layers
MAX_CONTEXT = 1 << 20        # tokens of context / sequence length
MAX_COUNT = 10 ** 12         # steps, tokens, evaluations, batches
MAX_SEED = 2 ** 63 - 1       # what torch.manual_seed and the samplers accept
THREADS_PER_CPU = 4          # threads may oversubscribe the machine's CPUs, by this much at most


def _threads_this_machine_allows(threads: int | None) -> int | None:
    cap = THREADS_PER_CPU * (os.cpu_count() or 1)
    if threads is not None and threads > cap:
        raise ValueError(f"{threads} is more than {THREADS_PER_CPU} x the {os.cpu_count() or 1} CPUs of this "
                         f"machine ({cap})")
    return threads


Threads = Annotated[int | None, Field(gt=0), AfterValidator(_threads_this_machine_allows)]
Count = Annotated[int, Field(gt=0, le=MAX_COUNT)]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class ModelConfig(Section):
    source: Literal["builtin", "hf"] = "builtin"
    preset: Literal["tiny", "simple", "scaled"] = "simple"
    # Optional overrides of the preset's sizes (built-in model only).
    d_model: int | None = Field(None, gt=0, le=MAX_WIDTH)
    n_heads: int | None = Field(None, gt=0, le=MAX_WIDTH)
    n_layers: int | None = Field(None, gt=0, le=MAX_WIDTH)
    d_ff: int | None = Field(None, gt=0, le=MAX_WIDTH)
    context_length: int | None = Field(None, ge=2, le=MAX_CONTEXT)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    tie_embeddings: bool = True
    hf_path: Path | None = None
    """A local directory written by save_pretrained (model.source: hf)."""
    hf_config: Path | None = None
    """A transformers config.json to build a fresh model from (model.source: hf)."""
    hf_overrides: dict[str, list[Any]] = Field(default_factory=dict)
    """Written by the run, never read: values of the HF config replaced to fit the tokenizer, {key: [given, used]}."""

    @model_validator(mode="after")
    def _hf_needs_one_origin(self):
        if self.source == "hf":
            if (self.hf_path is None) == (self.hf_config is None):
                raise ValueError("model.source 'hf' needs exactly one of model.hf_path or model.hf_config")
            if self.hf_path is not None and not (self.hf_path / "config.json").is_file():
                raise ValueError(f"model.hf_path {self.hf_path} has no config.json")
            if self.hf_config is not None and not self.hf_config.is_file():
                raise ValueError(f"model.hf_config {self.hf_config} does not exist")
        return self


def default_cache_dir() -> Path:
    return Path(os.environ.get("RYZEN_CACHE_DIR", Path.home() / ".cache" / "ryzen"))


class DataConfig(Section):
    source: str = "stdlib"
    """'stdlib' (the running Python's standard library source), a text file, a directory, or a .jsonl file."""
    text_field: str = "text"
    max_documents: Count | None = None
    vocab_size: int = Field(2048, ge=300, le=65536)
    seq_len: int = Field(128, gt=1, le=MAX_CONTEXT)
    cache_dir: Path = Field(default_factory=default_cache_dir)

    @model_validator(mode="after")
    def _source_exists(self):
        if self.source != "stdlib" and not Path(self.source).exists():
            raise ValueError(f"data.source {self.source} does not exist")
        return self


class TrainConfig(Section):
    seed: int = Field(0, ge=0, le=MAX_SEED)
    batch_size: int = Field(16, gt=0, le=MAX_CONTEXT)
    grad_accum: int = Field(1, gt=0, le=MAX_CONTEXT)
    lr: float = Field(2e-3, gt=0.0, le=1.0)
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0)
    warmup_steps: int = Field(30, ge=0, le=MAX_COUNT)
    weight_decay: float = Field(0.1, ge=0.0)
    beta1: float = Field(0.9, ge=0.0, lt=1.0)
    beta2: float = Field(0.95, ge=0.0, lt=1.0)
    grad_clip: float = Field(1.0, ge=0.0)
    max_steps: Count | None = 300
    max_tokens: int | None = Field(None, gt=0, le=MAX_COUNT * MAX_CONTEXT)
    max_seconds: float | None = Field(None, gt=0, le=MAX_COUNT)
    eval_every: Count = 100
    eval_batches: Count = 16
    early_stop_patience: int = Field(0, ge=0)
    """Evaluations without improvement before stopping; 0 turns early stopping off."""
    precision: Literal["fp32", "bf16", "auto"] = "auto"
    """The one owner of training precision. 'fp32': no bf16 anywhere; 'bf16': every variant trains under bf16
    autocast; 'auto': the trainer runs fp32 (so the baseline is plain fp32) and an optimization plugin may choose
    bf16 where the CPU has native bf16 (the kernel plugin measures it)."""
    hook_timeout_s: float | None = Field(900.0, gt=0, le=MAX_COUNT)
    """Longest one plugin hook call may take (on_export included) before the plugin is disabled as failed;
    null: no limit. The forward a plugin returns is part of a training step, not a hook call."""
    max_bad_steps: int = Field(5, gt=0)
    """Consecutive steps with NaN/inf loss or gradients before the run stops."""
    checkpoint_every: Count = 100
    threads: Threads = None

    @model_validator(mode="after")
    def _has_budget(self):
        if self.max_steps is None and self.max_tokens is None and self.max_seconds is None:
            raise ValueError("train needs a budget: set max_steps, max_tokens or max_seconds")
        return self


class ValidateConfig(Section):
    prompt_len: int = Field(32, gt=0)
    new_tokens: int = Field(32, ge=2)
    batch_sizes: list[int] = Field(default_factory=lambda: [1, 8], min_length=1)
    warmup: int = Field(2, ge=0)
    repeats: int = Field(7, gt=0)
    """Timed rounds at least; more are added while an interval is wider than target_half_width."""
    max_repeats: int = Field(15, gt=0)
    target_half_width: float = Field(0.05, gt=0)
    """Relative half-width of the ratio's confidence interval at which rounds stop being added."""
    perplexity_batches: int = Field(16, gt=0)
    isolation: Literal["process", "inline"] = "process"
    """'process': each backend built and run alone in a worker process, so its memory is its own and no
    engine's threads slow another's; 'inline': every backend in this process (faster to start, for tests)."""
    threads: Threads = None
    """Intra-op threads pinned in every worker (torch and, through RYZEN_BACKEND_THREADS, plugin engines);
    default: this process's torch thread count."""
    worker_timeout_s: float = Field(900.0, gt=0)
    """A worker that answers no request (start, one generation, perplexity) within this is stopped and reported."""
    settle_ms: int = Field(100, ge=0, le=10_000)
    """Pause before each timed run: thread pools that spin after their work (onnxruntime, OpenMP) in the
    worker that ran last park in this time instead of competing with the next backend's run."""

    @model_validator(mode="after")
    def _positive_batches(self):
        if any(b <= 0 for b in self.batch_sizes):
            raise ValueError("validate.batch_sizes must all be positive")
        return self


class OutputConfig(Section):
    dir: Path | None = None
    """Run directory; default runs/<UTC timestamp>."""


class RunConfig(BaseModel):
    """Everything one run needs. Extra top-level sections are plugin settings, checked by `resolve_plugin_settings`."""

    model_config = ConfigDict(extra="allow", validate_assignment=True, populate_by_name=True)

    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    validate_: ValidateConfig = Field(default_factory=ValidateConfig, alias="validate")
    output: OutputConfig = Field(default_factory=OutputConfig)
    plugins: list[str] = Field(default_factory=list)
    """Optimization plugins to apply, in order."""

    @model_validator(mode="after")
    def _plugins_once(self):
        repeated = sorted({n for n in self.plugins if self.plugins.count(n) > 1})
        if repeated:
            raise ValueError(f"plugins: '{repeated[0]}' is named more than once")
        return self

    @property
    def plugin_sections(self) -> dict[str, Any]:
        return dict(self.model_extra or {})

    def dump(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True)


CORE_SECTIONS = {"model", "data", "train", "validate", "output", "plugins"}


MAX_CONFIG_BYTES = 1 << 20
# Nodes of a YAML document counted as if every alias were copied out: a config has a few hundred;
# an alias bomb ("billion laughs") has billions and would take minutes and gigabytes to print.
MAX_YAML_NODES = 100_000


def cut(text: str, limit: int = 60) -> str:
    """Text the user gave, cut short: error messages echo it, whatever its size."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text):,} characters)"


def _expanded_nodes(node: yaml.Node, sizes: dict[int, int], open_nodes: set[int]) -> int:
    if id(node) in sizes:
        return sizes[id(node)]
    if id(node) in open_nodes:
        raise ConfigError("config error: a YAML alias refers to itself")
    open_nodes.add(id(node))
    children = ([n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode)
                else node.value if isinstance(node, yaml.SequenceNode) else [])
    total = 1 + sum(_expanded_nodes(child, sizes, open_nodes) for child in children)
    if total > MAX_YAML_NODES:
        raise ConfigError(f"config error: YAML aliases expand to more than {MAX_YAML_NODES:,} values")
    open_nodes.discard(id(node))
    sizes[id(node)] = total
    return total


def safe_yaml(text: str) -> Any:
    """yaml.safe_load with alias expansion bounded (each alias counted as the nodes it stands for)."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _expanded_nodes(node, {}, set())
        return loader.construct_document(node)
    finally:
        loader.dispose()


def read_config_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise ConfigError(f"config file {path} is {path.stat().st_size:,} bytes; a config is at most "
                          f"{MAX_CONFIG_BYTES:,}")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        utf16 = raw[:2] in (b"\xff\xfe", b"\xfe\xff")
        bom = " (it starts with a UTF-16 byte-order mark; save it as UTF-8)" if utf16 else ""
        raise ConfigError(f"config file {path} is not UTF-8 text (byte {exc.start}){bom}") from None
    kind = "JSON" if path.suffix == ".json" else "YAML"
    try:
        data = json.loads(text) if kind == "JSON" else safe_yaml(text)
    except (ValueError, yaml.YAMLError) as exc:  # ValueError: bad JSON, or an integer of over 4,300 digits
        raise ConfigError(f"config file {path} is not valid {kind}: {cut(str(exc).splitlines()[0], 200)}") from None
    except RecursionError:
        raise ConfigError(f"config file {path} nests values too deeply to be a config") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections, not {type(data).__name__}")
    return data


def apply_override(data: dict[str, Any], assignment: str) -> None:
    """Apply one `section.key=value` override; the value is parsed as YAML (numbers, booleans, lists)."""
    key, sep, raw = assignment.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set expects section.key=value, got {cut(repr(assignment))}")
    parts = key.strip().split(".")
    try:
        value = safe_yaml(raw) if raw.strip() else ""
    except (yaml.YAMLError, RecursionError, ValueError):  # ValueError: an integer of over 4,300 digits
        value = raw
    node = data
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {cut(key)}: {cut(repr(part))} is not a section")
        node = child
    node[parts[-1]] = value


def _format_errors(exc: ValidationError, prefix: str = "") -> str:
    parts = []
    for err in exc.errors():
        loc = cut(".".join(str(p) for p in err["loc"] if p != "__root__"))
        loc = f"{prefix}{loc}" if loc else prefix.rstrip(".")
        msg = err["msg"].removeprefix("Value error, ")
        got = err.get("input")
        detail = f" (got {cut(repr(got))})" if err["type"] not in ("missing", "value_error", "extra_forbidden") and not isinstance(got, dict) else ""
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        parts.append(f"{loc}: {msg}{detail}" if loc else f"{msg}{detail}")
    return "; ".join(parts)


def load_config(path: Path | None = None, overrides: Sequence[str] = (), plugins: Sequence[str] | None = None) -> RunConfig:
    """Defaults, then the file, then --set overrides, then --plugins; raises ConfigError naming each problem."""
    data = read_config_file(path) if path else {}
    for assignment in overrides:
        apply_override(data, assignment)
    if plugins is not None:
        data["plugins"] = list(plugins)
    try:
        return RunConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"config error: {_format_errors(exc)}") from None


def resolve_plugin_settings(config: RunConfig, settings_models: Mapping[str, type[BaseModel]]) -> dict[str, BaseModel | None]:
    """Validate each plugin section against its plugin's settings model; defaults for plugins without a section."""
    sections = config.plugin_sections
    unknown = sorted(set(sections) - set(settings_models))
    if unknown:
        raise ConfigError(
            f"config error: unknown section '{unknown[0]}' (core sections: {', '.join(sorted(CORE_SECTIONS))}; "
            f"plugin sections: {', '.join(sorted(settings_models)) or 'none installed'})"
        )
    resolved: dict[str, BaseModel | None] = {}
    for name, model in settings_models.items():
        try:
            resolved[name] = model.model_validate(sections.get(name) or {})
        except ValidationError as exc:
            raise ConfigError(f"config error: {_format_errors(exc, prefix=name + '.')}") from None
        # Keep the validated form in the config so `config show` and reports print the effective values.
        setattr(config, name, resolved[name].model_dump(mode="json"))
    return resolved


# fp32 weights, gradients and AdamW's two moments: what training holds per parameter, before activations.
TRAINING_BYTES_PER_PARAMETER = 16


def builtin_parameters(sizes) -> int:
    """Parameters of the built-in transformer of these sizes (norms left out: a lower bound)."""
    d = sizes.d_model
    head = 0 if sizes.tie_embeddings else sizes.vocab_size * d
    return (sizes.vocab_size + sizes.context_length) * d + head + sizes.n_layers * (4 * d * d + 2 * d * sizes.d_ff)


def check_fits_memory(sizes) -> None:
    """Refuse, before any work, a model whose training state alone exceeds this machine's memory."""
    try:
        memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not on this platform: nothing to compare with
        return
    parameters = builtin_parameters(sizes)
    need = parameters * TRAINING_BYTES_PER_PARAMETER
    if need > memory:
        raise ConfigError(f"config error: a model of {parameters:,} parameters needs at least {need / 2**30:,.1f} GiB "
                          f"to train ({TRAINING_BYTES_PER_PARAMETER} bytes each: weights, gradients, AdamW state), "
                          f"more than this machine's {memory / 2**30:,.1f} GiB; lower model.d_model, model.n_layers "
                          "or model.d_ff")


def check_model_fits_data(config: RunConfig) -> None:
    """Cross-field checks that need the model's sizes (data.seq_len vs its context, the tokenizer vs its
    vocabulary), made before any data is prepared; raises ConfigError naming both fields."""
    m = config.model
    if m.source == "builtin":
        from .models.build import builtin_config

        sizes = builtin_config(m, config.data.vocab_size)  # also checks d_model against n_heads
        check_fits_memory(sizes)
        context, where = sizes.context_length, ("model.context_length" if m.context_length
                                                else f"model.preset '{m.preset}'")
    else:
        from .models.hf import hf_config

        try:
            hf = hf_config(m.hf_path or m.hf_config)
        except ValueError as exc:  # bad JSON, no model_type, a model_type transformers does not know
            raise ConfigError(f"config error: model.{'hf_path' if m.hf_path else 'hf_config'}: "
                              f"{str(exc).splitlines()[0].split('. ')[0]}") from None
        context = getattr(hf, "max_position_embeddings", None)
        where = f"max_position_embeddings of {m.hf_path / 'config.json' if m.hf_path else m.hf_config}"
        if m.hf_path is not None:
            from .data import Tokenizer

            tokens = Tokenizer.from_hf_dir(m.hf_path).vocab_size
            if tokens > hf.vocab_size:
                raise ConfigError(f"config error: the tokenizer in model.hf_path {m.hf_path} has {tokens} tokens but "
                                  f"the model's vocab_size is {hf.vocab_size}; save them together (save_pretrained)")
    if context is not None and config.data.seq_len > context:
        raise ConfigError(f"config error: data.seq_len ({config.data.seq_len}) exceeds the model's context of "
                          f"{context} tokens ({where}); lower data.seq_len or use a longer context")
