"""Hook implementations of the runtimes plugin (entry-point name `runtimes`).

Every engine is optional: its module is imported only inside a hook, and an engine that is not
installed (or cannot take this model) is skipped with the reason recorded, never an error. The
plugin keeps no state between hooks, so the hooks are module functions.
"""
from __future__ import annotations

import importlib
import logging
import shutil
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator

from ryzen_core import ExportResult, PluginSettings, hookimpl

log = logging.getLogger(__name__)

ENGINE_MODULES = {"ctranslate2": "ctranslate2_engine", "llamacpp": "gguf_engine", "openvino": "openvino_engine",
                  "genai": "genai_engine"}
BACKEND_CLASSES = {"ctranslate2": "CTranslate2Backend", "llamacpp": "LlamaCppBackend",
                   "openvino": "OpenVinoBackend", "genai": "GenaiBackend"}
SOURCE_DIR = ".runtimes-hf-source"  # hidden: a work directory, not an export to validate
SOURCE_MARKER = ".ryzen-runtimes-source"
RYZEN_GRAPH = "ryzen-"  # precision prefix: onnxruntime-genai running the onnx plugin's graph
Engine = Literal["ctranslate2", "llamacpp", "openvino", "genai"]


class RuntimesSettings(PluginSettings):
    engines: list[Engine] = ["ctranslate2", "llamacpp", "openvino", "genai"]
    """Engines to build, each only where it is installed."""
    ctranslate2: list[Literal["float32", "int8"]] = ["float32", "int8"]
    """CTranslate2 weight types (int8 runs with int8 weights and float32 everything else)."""
    llamacpp: list[Literal["F16", "Q8_0", "Q4_0", "TQ2_0"]] = ["F16", "Q8_0", "Q4_0"]
    """GGUF weight types for llama.cpp. TQ2_0 (2.06 bits/weight, ternary per block of 256) is exact only for a
    BitNet-trained model (the bitnet plugin's weights) and keeps embeddings and LM head in F16."""
    openvino: list[Literal["fp32", "int8", "int4"]] = ["fp32", "int8", "int4"]
    """OpenVINO weight types (int8/int4 through nncf's weight compression)."""
    genai: list[Literal["fp32", "int8", "int4"]] = ["int8", "int4"]
    """onnxruntime-genai model-builder precisions (weight-only MatMulNBits for int8/int4)."""
    genai_graphs: list[Literal["builder", "ryzen"]] = ["builder"]
    """Graphs onnxruntime-genai runs: its model builder's (`genai-<precision>`) and/or the onnx plugin's
    fused graph (`genai-ryzen-<precision>`). Both side by side separate the graph from the decode loop."""
    block_size: int = Field(32, ge=16, le=256)
    """Weights per quantization block for onnxruntime-genai int4 and OpenVINO int4 (a power of two)."""
    parity_tokens: int = Field(32, ge=2)
    """Tokens of fixed text on which each export's logits are compared with the torch model's."""
    fp32_tolerance: float = Field(1e-3, gt=0)
    """fp32 exports: largest |logit difference| from torch allowed; beyond it the export is dropped as wrong."""
    min_top1: float = Field(0.5, ge=0, le=1)
    """Reduced-precision exports: least fraction of positions whose top token matches torch's."""

    @field_validator("block_size")
    @classmethod
    def _power_of_two(cls, value: int) -> int:
        if value & (value - 1):
            raise ValueError(f"block_size must be a power of two, got {value}")
        return value

    def wanted(self) -> list[tuple[str, str]]:
        """(engine, precision) pairs; the genai runs of the onnx plugin's graph as precision 'ryzen-<p>'."""
        pairs = []
        for engine in dict.fromkeys(self.engines):
            for precision in dict.fromkeys(getattr(self, engine)):
                if engine != "genai" or "builder" in self.genai_graphs:
                    pairs.append((engine, precision))
                if engine == "genai" and "ryzen" in self.genai_graphs:
                    pairs.append((engine, f"{RYZEN_GRAPH}{precision}"))
        return pairs


def engine_module(engine: str):
    return importlib.import_module(f".{ENGINE_MODULES[engine]}", __package__)


def export_name(engine: str, precision: str) -> str:
    return f"{engine}-{precision.lower()}"


def fresh_dir(directory: Path, ours: bool) -> Path:
    """An empty `directory`; an older export of ours there is replaced, anything else is left alone."""
    from .manifest import EngineSkipped

    if directory.exists():
        if not ours and any(directory.iterdir()):
            raise EngineSkipped(f"{directory} exists, is not empty and was not written by this plugin")
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    return directory


def export_all(model: Any, tokenizer: Any, export_dir: str | Path, settings: RuntimesSettings | None = None,
               record: Any = None) -> ExportResult:
    """Convert `model` for every wanted engine that is installed; returns what on_export returns: the kept
    exports and, in `details` by export name, `skipped` (why not built or dropped), `sizes_bytes`,
    `parity` (with torch) and `tokenizer` (identity of the engine's own tokenizer)."""
    from .manifest import EngineSkipped, directory_bytes

    settings = settings or RuntimesSettings()
    record = record or (lambda event, **data: None)
    export_dir = Path(export_dir)
    # No live backends in the result: the validator loads each export in its own worker process, and
    # engines held here would keep a copy of every model in this process for the whole validation.
    result = ExportResult(details={"skipped": {}, "sizes_bytes": {}, "parity": {}, "tokenizer": {}})
    details = result.details

    def skip(name: str, reason: str) -> None:
        details["skipped"][name] = reason
        record("skipped", export=name, reason=reason)

    wanted = []
    for engine, precision in settings.wanted():
        reason = engine_module(engine).missing()
        if reason:
            skip(export_name(engine, precision), reason)
        else:
            wanted.append((engine, precision))
    if not wanted:
        return result
    try:
        source, manifest_details = prepare_source(model, tokenizer, export_dir)
    except EngineSkipped as exc:
        for engine, precision in wanted:
            skip(export_name(engine, precision), str(exc))
        return result
    parity_ids = fixed_token_ids(tokenizer, settings.parity_tokens, manifest_details["context_length"], model)
    for engine, precision in wanted:
        name = export_name(engine, precision)
        try:
            out_dir = build_export(engine, precision, source, export_dir, {**manifest_details, "name": name}, settings,
                                   model)
            checks = check_export(out_dir, precision.removeprefix(RYZEN_GRAPH), model, tokenizer, parity_ids,
                                  settings)
        except EngineSkipped as exc:
            skip(name, str(exc))
            continue
        result.exports[name] = out_dir
        details["sizes_bytes"][name] = directory_bytes(out_dir)
        details["parity"][name], details["tokenizer"][name] = checks["parity"], checks["tokenizer"]
        record("export", export=name, path=str(out_dir), bytes=details["sizes_bytes"][name], **checks)
    return result


def prepare_source(model: Any, tokenizer: Any, export_dir: Path) -> tuple[Path, dict[str, Any]]:
    """The HF directory the converters read, and the details every manifest carries."""
    from .hf_source import hf_architecture, unwrap, write_hf_source

    source = export_dir / SOURCE_DIR
    write_hf_source(model, tokenizer, fresh_dir(source, (source / SOURCE_MARKER).is_file()))
    (source / SOURCE_MARKER).touch()
    architecture = hf_architecture(model)
    context_length = unwrap(model).config.context_length if architecture == "gpt2" else None  # learned positions
    return source, {"architecture": architecture, "eos_token_id": tokenizer.eos_id, "context_length": context_length}


def build_export(engine: str, precision: str, source: Path, export_dir: Path, details: dict[str, Any],
                 settings: RuntimesSettings, model: Any = None) -> Path:
    """One engine's export in export_dir/<name>; EngineSkipped (and nothing left behind) when it cannot be built."""
    from .manifest import EngineSkipped, read_manifest

    module, out_dir = engine_module(engine), export_dir / details["name"]
    fresh_dir(out_dir, read_manifest(out_dir) is not None)
    try:
        if engine == "openvino":
            module.export(export_dir, out_dir, precision, details, block_size=settings.block_size)
        elif engine == "genai":
            module.export(source, out_dir, precision.removeprefix(RYZEN_GRAPH), details,
                          block_size=settings.block_size, model=model, ryzen_graph=precision.startswith(RYZEN_GRAPH))
        else:
            module.export(source, out_dir, precision, details)
    except EngineSkipped:
        shutil.rmtree(out_dir, ignore_errors=True)
        raise
    except Exception as exc:  # one engine's converter failing must not take the other engines down
        shutil.rmtree(out_dir, ignore_errors=True)
        raise EngineSkipped(f"the {engine} conversion failed: {short_message(exc)}") from exc
    return out_dir


def check_export(out_dir: Path, precision: str, model: Any, tokenizer: Any, parity_ids,
                 settings: RuntimesSettings) -> dict[str, Any]:
    """Parity with torch and tokenizer identity of a built export; an export that fails or disagrees
    with torch is deleted and EngineSkipped says why."""
    from .manifest import EngineSkipped

    try:
        backend = load_backend(out_dir)
        parity = logits_parity(model, backend, parity_ids)
        failure = parity_failure(parity, precision, settings)
        tokenizer_check = tokenizer_identity(backend, tokenizer)
    except Exception as exc:  # engines raise their own types; any of them means this export does not run
        failure = f"it fails on a batch of {len(parity_ids)}: {short_message(exc)}"
    finally:
        backend = None  # release the engine now: the validation loads it again where it is measured
    if failure:
        shutil.rmtree(out_dir, ignore_errors=True)
        raise EngineSkipped(f"dropped, {failure}")
    return {"parity": parity, "tokenizer": tokenizer_check}


def short_message(exc: BaseException) -> str:
    """The exception in one line; the last line, because C++ engines put their call stack first."""
    return f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[-1]}"


def fixed_token_ids(tokenizer: Any, n_tokens: int, context_length: int | None, model: Any):
    """[2, n] ids from the start and the end of the fixed identity texts, within the model's vocabulary and
    context. Two rows, because some engine graphs run at batch 1 and fail or go wrong at batch 2."""
    import torch

    from ryzen_core import lm_logits

    from .texts import IDENTITY_TEXTS

    ids = tokenizer.encode("\n".join(IDENTITY_TEXTS))
    n = min(n_tokens, context_length or n_tokens, len(ids))
    with torch.inference_mode():
        vocab = lm_logits(model, torch.tensor([ids[:1]])).shape[-1]
    return torch.tensor([ids[:n], ids[-n:]]) % vocab


def logits_parity(model: Any, backend: Any, token_ids) -> dict[str, float]:
    """Largest |logit difference| from the torch model, and how often both pick the same top token."""
    import torch

    from ryzen_core import lm_logits

    with torch.inference_mode():
        expected = lm_logits(model.eval(), token_ids).float()
    got = backend.logits(token_ids)
    return {"max_abs_logit_diff": float((got - expected).abs().max()),
            "top1_agreement": float((got.argmax(-1) == expected.argmax(-1)).float().mean()),
            "tokens": int(token_ids.numel())}


def parity_failure(parity: dict[str, float], precision: str, settings: RuntimesSettings) -> str | None:
    """Why an export is too far from torch to keep, or None."""
    if precision.lower() in ("fp32", "float32"):
        if not parity["max_abs_logit_diff"] <= settings.fp32_tolerance:  # `not <=` also catches NaN
            return (f"max |logit difference| {parity['max_abs_logit_diff']:.3g} > "
                    f"fp32_tolerance {settings.fp32_tolerance}")
    elif not parity["top1_agreement"] >= settings.min_top1:
        return f"top-1 agreement {parity['top1_agreement']:.2f} < min_top1 {settings.min_top1}"
    return None


def tokenizer_identity(backend: Any, tokenizer: Any) -> dict[str, Any]:
    """Whether the engine's own tokenizer gives Ryzen's ids on the fixed texts (engines without one: not checked)."""
    from .texts import IDENTITY_TEXTS

    if not hasattr(backend, "encode"):
        return {"checked": False}
    different = [text for text in IDENTITY_TEXTS if backend.encode(text) != tokenizer.encode(text)]
    return {"checked": True, "texts": len(IDENTITY_TEXTS), "identical": not different, "different": different}


@hookimpl
def ryzen_settings():
    return RuntimesSettings


@hookimpl
def on_export(model, tokenizer, export_dir, settings, record):
    return export_all(model, tokenizer, export_dir, settings, record)


WEIGHTLESS_SUFFIXES = {".json", ".txt", ".model", ".md"}


@hookimpl
def load_backend(path):
    """The backend for one of our export directories, built from the directory alone (a fresh worker
    process can call this); None for directories of other plugins or an engine not installed here."""
    from .manifest import RuntimeExportError, read_manifest

    manifest = read_manifest(path)
    if manifest is None:
        return None
    engine = manifest["engine"]
    if engine not in ENGINE_MODULES:
        raise RuntimeExportError(f"{path}: unknown engine {engine!r} in its runtime.json")
    module = engine_module(engine)
    reason = module.missing()
    if reason:
        log.warning("cannot run the %s export %s here: %s", engine, path, reason)
        return None
    backend = getattr(module, BACKEND_CLASSES[engine])(Path(path), manifest)
    # For the core's runtime table (docs/plugins.md, load_backend): the engine's files are its weights,
    # less the tokenizer and manifests; an embedding table inside them is counted whole (an upper bound).
    backend.precision = manifest["precision"]
    backend.weight_bytes = sum(f.stat().st_size for f in Path(path).rglob("*")
                               if f.is_file() and f.suffix not in WEIGHTLESS_SUFFIXES)
    return backend
