"""OpenVINO: the model as optimum-intel would export it (stateful, ScaledDotProductAttention), written from the
HF source directory by openvino_builder, weights optionally compressed to int8/int4 by nncf, run by our
decode loop on OpenVINO's CPU plugin."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from ryzen_core import OnToken

from .loop import check_request, decode_loop, default_threads
from .manifest import EngineSkipped, write_manifest

ENGINE = "openvino"
PRECISIONS = ("fp32", "int8", "int4")
IR_FILE = "model.xml"


def missing() -> str | None:
    try:
        import openvino  # noqa: F401
    except ImportError:
        return "openvino is not installed (pip install 'ryzen-plugin-runtimes[openvino]')"
    return None


def compress(model, precision: str, block_size: int):
    """int8: per-channel asymmetric weights; int4: symmetric blocks of `block_size` (nncf's weight compression,
    which keeps the embedding and the output head at int8 under int4, as optimum-intel's exports do)."""
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


def hf_source_model(export_dir: Path):
    """The HF model the plugin wrote under export_dir (GPT-2 for the built-in model, Llama as it is)."""
    from ryzen_core import load_hf_model

    from .plugin import SOURCE_DIR

    source = export_dir / SOURCE_DIR
    if not (source / "config.json").is_file():
        raise EngineSkipped(f"OpenVINO builds from the HF source directory and {source} has none")
    return load_hf_model(source).float()


def export(export_dir: Path, out_dir: Path, precision: str, details: dict[str, Any], block_size: int = 32) -> Path:
    """A stateful OpenVINO IR (model.xml/.bin) built from the weights, nncf-compressed for int8/int4."""
    import openvino as ov

    from .openvino_builder import build_model

    model = compress(build_model(hf_source_model(Path(export_dir))), precision, block_size)
    ov.save_model(model, str(out_dir / IR_FILE), compress_to_fp16=False)
    # fp32 keeps its KV cache in f32 (exact); int8/int4 take the CPU plugin's default cache precision
    # (u8 on x86 in openvino 2026.4), as users running such a model get.
    write_manifest(out_dir, ENGINE, precision, file=IR_FILE, block_size=block_size,
                   kv_cache_precision="f32" if precision == "fp32" else None, **details)
    return out_dir


class OpenVinoBackend:
    """The stateful IR on the CPU plugin at f32 inference precision (OpenVINO would pick bf16 on CPUs that have
    it, and then even the fp32 export would not compute in fp32). The KV cache lives in the infer request's
    state: each generate and logits call starts by resetting it."""

    def __init__(self, directory: str | Path, manifest: dict[str, Any], threads: int | None = None):
        import openvino as ov

        self.directory = Path(directory)
        self.name = manifest["name"]
        self.context_length = manifest.get("context_length")  # learned positions: a hard limit; rotary: none
        config = {"INFERENCE_NUM_THREADS": default_threads(threads), "INFERENCE_PRECISION_HINT": "f32",
                  "PERFORMANCE_HINT": "LATENCY"}
        if manifest.get("kv_cache_precision"):
            config["KV_CACHE_PRECISION"] = manifest["kv_cache_precision"]
        compiled = ov.Core().compile_model(str(self.directory / manifest["file"]), "CPU", config)
        self.kv_cache_precision = compiled.get_property("KV_CACHE_PRECISION").get_type_name()  # "f32", "u8"
        self.request = compiled.create_infer_request()
        self.past_length = 0

    def forward(self, ids: np.ndarray) -> np.ndarray:
        """One forward of `ids` [B, T] after the request's cached past; the logits [B, T, V], shared with the
        request (valid until its next infer)."""
        batch, new_len = ids.shape
        total = self.past_length + new_len
        result = self.request.infer({
            "input_ids": ids, "attention_mask": np.ones((batch, total), dtype=np.int64),
            "position_ids": np.broadcast_to(np.arange(self.past_length, total, dtype=np.int64), (batch, new_len)),
            "beam_idx": np.arange(batch, dtype=np.int32)}, share_outputs=True)
        self.past_length = total
        return result["logits"]

    def reset(self) -> None:
        """Forget the cached sequence (the request's state)."""
        self.request.reset_state()
        self.past_length = 0

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        ids = check_request(input_ids, context_length=self.context_length)
        self.reset()
        logits = torch.from_numpy(np.array(self.forward(ids)))
        self.reset()  # do not hold this sequence's cache until the next call
        return logits

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, *, on_token: OnToken | None = None,
                 **sampling) -> torch.Tensor:
        ids = check_request(input_ids, max_new_tokens, self.context_length)
        self.reset()
        try:
            return decode_loop(lambda feed: np.array(self.forward(feed)[:, -1, :]), input_ids, ids, max_new_tokens,
                               on_token=on_token, **sampling)
        finally:
            self.reset()
