"""OpenVINO: the onnx plugin's fp32 export (a graph with KV-cache inputs and outputs) compiled by
OpenVINO's CPU plugin, weights optionally compressed to int8/int4 by nncf, run by our decode loop."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ryzen_core import OnToken

from .loop import check_request, decode_loop, default_threads
from .manifest import EngineSkipped, write_manifest

ENGINE = "openvino"
PRECISIONS = ("fp32", "int8", "int4")
ONNX_EXPORT = "onnx-fp32"  # the directory the onnx plugin writes under the run's export/
ONNX_LAYOUT_KEYS = ("layers", "kv_heads", "head_dim", "context_length", "hard_context_limit", "input_names",
                    "output_names")
IR_FILE = "model.xml"


def missing() -> str | None:
    try:
        import openvino  # noqa: F401
    except ImportError:
        return "openvino is not installed (pip install 'ryzen-plugin-runtimes[openvino]')"
    return None


def onnx_source(export_dir: Path) -> tuple[Path, dict[str, Any]]:
    """The onnx plugin's fp32 model and its KV-cache layout (from its export.json), or EngineSkipped."""
    directory = export_dir / ONNX_EXPORT
    manifest_path, model_path = directory / "export.json", directory / "model.onnx"
    if not (manifest_path.is_file() and model_path.is_file()):
        raise EngineSkipped(f"OpenVINO converts the onnx plugin's fp32 export and {directory} has none "
                            "(run with --plugins onnx,runtimes, onnx first)")
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    if any(key not in manifest for key in ONNX_LAYOUT_KEYS):
        raise EngineSkipped(f"{manifest_path} lacks the KV-cache layout ({', '.join(ONNX_LAYOUT_KEYS)})")
    return model_path, {key: manifest[key] for key in ONNX_LAYOUT_KEYS}


def compress(model, precision: str, block_size: int):
    """int8: per-channel asymmetric weights; int4: symmetric blocks of `block_size` (nncf's weight compression)."""
    if precision == "fp32":
        return model
    try:
        import nncf
    except ImportError:
        raise EngineSkipped("OpenVINO weight compression needs nncf, which is not installed "
                            "(pip install 'ryzen-plugin-runtimes[openvino]')") from None
    if precision == "int8":
        return nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT8_ASYM)
    return nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT4_SYM, group_size=block_size, ratio=1.0)


def export(export_dir: Path, out_dir: Path, precision: str, details: dict[str, Any], block_size: int = 32) -> Path:
    """fp32: the ONNX files themselves, which OpenVINO compiles directly (its IR cannot hold the
    onnxruntime contrib ops of the onnx plugin's fused graph). int8/int4: nncf-compressed IR."""
    import openvino as ov

    model_path, layout = onnx_source(export_dir)
    if precision == "fp32":
        for file in model_path.parent.glob(f"{model_path.name}*"):  # the graph and its external data, if any
            shutil.copy2(file, out_dir / file.name)
        model_file = model_path.name
    else:
        model = compress(ov.convert_model(str(model_path)), precision, block_size)
        model_file = IR_FILE
        ov.save_model(model, str(out_dir / IR_FILE), compress_to_fp16=False)
        try:
            ov.Core().read_model(str(out_dir / IR_FILE))
        except RuntimeError as exc:
            raise EngineSkipped(f"OpenVINO IR cannot hold this graph: {str(exc).splitlines()[0]}") from None
    write_manifest(out_dir, ENGINE, precision, file=model_file, block_size=block_size, **{**details, **layout})
    return out_dir


class OpenVinoBackend:
    """OpenVINO IR on the CPU plugin at f32 inference precision (OpenVINO would pick bf16 on CPUs that have
    it, and then even the fp32 export would not compute in fp32)."""

    def __init__(self, directory: str | Path, manifest: dict[str, Any], threads: int | None = None):
        import openvino as ov

        self.directory = Path(directory)
        self.name = manifest["name"]
        self.layers, self.kv_heads, self.head_dim = manifest["layers"], manifest["kv_heads"], manifest["head_dim"]
        self.context_length = manifest["context_length"] if manifest["hard_context_limit"] else None
        self.input_names, self.output_names = manifest["input_names"], manifest["output_names"]
        compiled = ov.Core().compile_model(str(self.directory / manifest["file"]), "CPU", {
            "INFERENCE_NUM_THREADS": default_threads(threads), "INFERENCE_PRECISION_HINT": "f32",
            "PERFORMANCE_HINT": "LATENCY"})
        self.request = compiled.create_infer_request()
        self.outputs = [compiled.output(name) for name in self.output_names]

    def _step(self, ids: np.ndarray, past: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        """One forward. Feeds go by name: the onnx plugin's fused graph also takes attention_mask and
        position_ids, its traced graph only input_ids and the past."""
        batch, new_len = ids.shape
        past_len = past[0].shape[2]
        given = {"input_ids": ids, "attention_mask": np.ones((batch, past_len + new_len), dtype=np.int64),
                 "position_ids": np.broadcast_to(np.arange(past_len, past_len + new_len, dtype=np.int64),
                                                 (batch, new_len)).copy()}
        past_names = [n for n in self.input_names if n not in given]
        feeds = {**{n: given[n] for n in self.input_names if n in given}, **dict(zip(past_names, past))}
        result = self.request.infer(feeds)
        values = [np.array(result[output]) for output in self.outputs]  # copies: the request reuses its buffers
        return values[0], values[1:]

    def _empty_past(self, batch: int) -> list[np.ndarray]:
        return [np.zeros((batch, self.kv_heads, 0, self.head_dim), dtype=np.float32)] * (2 * self.layers)

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        ids = check_request(input_ids, context_length=self.context_length)
        return torch.from_numpy(self._step(ids, self._empty_past(len(ids)))[0])

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, *, on_token: OnToken | None = None,
                 **sampling) -> torch.Tensor:
        ids = check_request(input_ids, max_new_tokens, self.context_length)
        past = self._empty_past(len(ids))

        def step(feed: np.ndarray) -> np.ndarray:
            nonlocal past
            logits, past = self._step(feed, past)
            return logits[:, -1, :]

        return decode_loop(step, input_ids, ids, max_new_tokens, on_token=on_token, **sampling)
