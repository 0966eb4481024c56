"""onnxruntime-genai: its model builder writes the graph (MatMulNBits weights, GroupQueryAttention
with a shared past/present buffer, fused norms), its `Generator` runs the decode loop natively."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ryzen_core import OnToken

from .loop import assemble, check_request, default_threads
from .manifest import EngineSkipped, write_manifest

ENGINE = "genai"
PRECISIONS = ("fp32", "int8", "int4")
BUILDER_ARCHITECTURES = ("llama",)  # the builder has no GPT-2; these are the ones tested here


def missing() -> str | None:
    try:
        import onnxruntime_genai  # noqa: F401
    except ImportError:
        return "onnxruntime-genai is not installed (pip install 'ryzen-plugin-runtimes[genai]')"
    return None


def export(source: Path, out_dir: Path, precision: str, details: dict[str, Any], block_size: int = 32,
           model: Any = None, ryzen_graph: bool = False) -> Path:
    """Run the builder (in its own process: it imports its own torch/transformers state) on `source`.
    With `ryzen_graph`, or for a model the builder cannot write (the built-in one, a GPT-2 for it), the
    onnx plugin's fused graph instead, which onnxruntime-genai runs as it is: the same contrib ops,
    names and genai_config."""
    model_type = json.loads((source / "config.json").read_text(encoding="utf-8")).get("model_type")
    if ryzen_graph and model_type not in BUILDER_ARCHITECTURES:
        raise EngineSkipped(f"the same graph as genai-{precision}: the builder has no {model_type!r}, so that "
                            "export already runs the onnx plugin's graph")
    if ryzen_graph or model_type not in BUILDER_ARCHITECTURES:
        if model is None:
            raise EngineSkipped(f"onnxruntime-genai's model builder does not build {model_type!r} models "
                                f"(built here: {', '.join(BUILDER_ARCHITECTURES)})")
        _ryzen_graph(model, out_dir, precision, block_size)
        for name in ("tokenizer.json", "tokenizer_config.json"):  # genai's tokenizer reads them from the model
            if (source / name).is_file():
                shutil.copy2(source / name, out_dir / name)
        why = "asked for" if ryzen_graph else f"onnxruntime-genai's builder has no {model_type!r}"
        write_manifest(out_dir, ENGINE, precision, block_size=block_size,
                       graph=f"ryzen fused graph (onnx plugin): {why}", **details)
        return out_dir
    with tempfile.TemporaryDirectory(prefix="genai-builder-") as cache:
        command = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(source), "-o", str(out_dir),
                   "-p", precision, "-e", "cpu", "-c", cache, "--extra_options", f"int4_block_size={block_size}"]
        done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise EngineSkipped(f"the onnxruntime-genai model builder failed: {last}")
    write_manifest(out_dir, ENGINE, precision, block_size=block_size, graph="onnxruntime-genai model builder",
                   **details)
    return out_dir


def _ryzen_graph(model: Any, out_dir: Path, precision: str, block_size: int) -> None:
    try:
        from ryzen_plugin_onnx_export.fused_export import GENAI_CONFIG, export_fused, quantize_weights
        from ryzen_plugin_onnx_export.graph_builder import UnsupportedModel
    except ImportError:
        raise EngineSkipped("onnxruntime-genai's builder has no GPT-2, and the onnx plugin, whose fused graph "
                            "it could run instead, is not installed") from None
    with tempfile.TemporaryDirectory(prefix="genai-ryzen-graph-") as work:
        try:
            built = export_fused(model, None, Path(work) / "fp32")
        except UnsupportedModel as exc:
            raise EngineSkipped(f"the fused graph cannot write this model: {exc}") from None
        if precision != "fp32":
            built = quantize_weights(built, Path(work) / precision, precision=precision, block_size=block_size)
        # Only the graph and genai's config: the onnx plugin's export.json would make its load_backend claim it.
        for name in ("model.onnx", "model.onnx.data", GENAI_CONFIG):
            if (built / name).is_file():
                shutil.copy2(built / name, out_dir / name)


class GenaiBackend:
    """An onnxruntime-genai model: `og.Generator` decodes, timing each `generate_next_token`.

    Stopping at eos is left to this class (the config overlay gives the generator no eos), so
    eos can be disabled as the validator requires without masking it out of the choices.
    Full-sequence logits come from the same ONNX graph run by a plain onnxruntime session.
    """

    def __init__(self, directory: str | Path, manifest: dict[str, Any], threads: int | None = None):
        import onnxruntime_genai as og

        self.directory = Path(directory)
        self.name = manifest["name"]
        self.threads = default_threads(threads)
        config = og.Config(str(self.directory))
        config.clear_providers()  # the CPU provider
        config.overlay(json.dumps({"model": {"eos_token_id": [], "decoder": {"session_options": {
            "intra_op_num_threads": self.threads, "inter_op_num_threads": 1}}}}))
        self.model = og.Model(config)
        genai_config = json.loads((self.directory / "genai_config.json").read_text(encoding="utf-8"))["model"]
        self.vocab_size = int(genai_config["vocab_size"])
        self.decoder = genai_config["decoder"]
        self._session = None

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, *, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, eos_token_id: int | None = None, generator: torch.Generator | None = None,
                 on_token: OnToken | None = None) -> torch.Tensor:
        import onnxruntime_genai as og

        ids = check_request(input_ids, max_new_tokens)
        if max_new_tokens == 0:
            return input_ids
        batch, prompt_len = ids.shape
        params = og.GeneratorParams(self.model)
        search: dict[str, Any] = {"max_length": prompt_len + max_new_tokens, "batch_size": batch, "do_sample": False}
        if temperature > 0.0:
            seed = 0 if generator is None else int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
            search.update(do_sample=True, temperature=temperature, top_k=top_k or self.vocab_size, top_p=top_p,
                          random_seed=seed)
        params.set_search_options(**search)
        engine = og.Generator(self.model, params)
        engine.append_tokens(ids.astype(np.int32))
        rows: list[list[int]] = [[] for _ in range(batch)]
        finished = np.zeros(batch, dtype=bool)
        for step in range(max_new_tokens):
            engine.generate_next_token()
            tokens = engine.get_next_tokens()
            for row, token in zip(rows, tokens.tolist()):
                row.append(token)
            if on_token is not None:
                on_token(step)
            if eos_token_id is not None:
                finished |= tokens == eos_token_id
                if finished.all():
                    break
        if eos_token_id is not None:  # tokens after a row's eos are replaced by eos, as the torch loop pads
            rows = [row[: row.index(eos_token_id) + 1] if eos_token_id in row else row for row in rows]
        return assemble(input_ids, rows, eos_token_id).to(input_ids.device)

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        ids = check_request(input_ids)
        session = self.session()
        feeds: dict[str, np.ndarray] = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
        for item in session.get_inputs():
            if item.name == "position_ids":  # the fused graph of a model with learned positions
                feeds[item.name] = np.broadcast_to(np.arange(ids.shape[1], dtype=np.int64), ids.shape).copy()
            if item.name.startswith("past_key_values"):
                heads, head_size = self.decoder["num_key_value_heads"], self.decoder["head_size"]
                feeds[item.name] = np.zeros((len(ids), heads, 0, head_size), dtype=np.float32)
        return torch.from_numpy(session.run(["logits"], feeds)[0].astype(np.float32))

    def session(self):
        """The builder's graph in plain onnxruntime, made on first use (the generator gives only the last position)."""
        if self._session is None:
            import onnxruntime as ort

            options = ort.SessionOptions()
            options.intra_op_num_threads = self.threads
            options.log_severity_level = 3
            self._session = ort.InferenceSession(str(self.directory / self.decoder["filename"]), options,
                                                 providers=["CPUExecutionProvider"])
        return self._session

    def encode(self, text: str) -> list[int]:
        """onnxruntime-genai's own tokenizer on `text`."""
        import onnxruntime_genai as og

        return og.Tokenizer(self.model).encode(text).tolist()
