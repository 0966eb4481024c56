"""CTranslate2: converted with its Transformers converter, run by its own generation loop."""
from __future__ import annotations

import json
import weakref
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ryzen_core import OnToken

from .loop import StepStamps, assemble, check_request, default_threads
from .manifest import EngineSkipped, write_manifest

ENGINE = "ctranslate2"
PRECISIONS = ("float32", "int8")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")  # copied in so the directory stands alone
COMPUTE_TYPES = {"float32": "float32", "int8": "int8_float32"}  # int8 weights, float32 everything else


def missing() -> str | None:
    try:
        import ctranslate2  # noqa: F401
    except ImportError:
        return "ctranslate2 is not installed (pip install 'ryzen-plugin-runtimes[ctranslate2]')"
    return None


def export(source: Path, out_dir: Path, precision: str, details: dict[str, Any]) -> Path:
    """Convert the HF directory `source` into `out_dir` with weights in `precision`."""
    from ctranslate2.converters import TransformersConverter

    try:
        converter = TransformersConverter(str(source), copy_files=list(TOKENIZER_FILES))
        converter.convert(str(out_dir), quantization=precision, force=True)
    except (ValueError, NotImplementedError) as exc:  # the converter's words for an unsupported model
        raise EngineSkipped(f"CTranslate2 cannot convert this model: {exc}") from None
    write_manifest(out_dir, ENGINE, precision, compute_type=COMPUTE_TYPES[precision], **details)
    return out_dir


class CTranslate2Backend:
    """A CTranslate2 `Generator`; CTranslate2 speaks in token strings, so ids go through its vocabulary."""

    def __init__(self, directory: str | Path, manifest: dict[str, Any], threads: int | None = None):
        import ctranslate2

        self.directory = Path(directory)
        self.name = manifest["name"]
        self.context_length: int | None = manifest.get("context_length")
        self.vocabulary: list[str] = json.loads((self.directory / "vocabulary.json").read_text(encoding="utf-8"))
        # The generator must be destroyed before the interpreter shuts down: left to exit-time teardown,
        # its thread pool aborts the process ("terminate called without an active exception") most times.
        self._holder = [ctranslate2.Generator(str(self.directory), device="cpu", compute_type=manifest["compute_type"],
                                              intra_threads=default_threads(threads))]
        weakref.finalize(self, self._holder.clear)

    @property
    def generator(self):
        return self._holder[0]

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        ids = check_request(input_ids, context_length=self.context_length)
        return torch.from_numpy(np.array(self.generator.forward_batch(ids.tolist()), dtype=np.float32))

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, *, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, eos_token_id: int | None = None, generator: torch.Generator | None = None,
                 on_token: OnToken | None = None) -> torch.Tensor:
        import ctranslate2

        ids = check_request(input_ids, max_new_tokens, self.context_length)
        if max_new_tokens == 0:
            return input_ids
        sampling: dict[str, Any] = {"sampling_topk": 1}
        if temperature > 0.0:
            sampling = {"sampling_topk": top_k, "sampling_topp": top_p, "sampling_temperature": temperature}
            if generator is not None:  # CTranslate2 samples from its own RNG: seed it from `generator`
                ctranslate2.set_random_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=generator)))
        stamps = StepStamps(on_token)

        def stamp(step_result) -> bool:
            stamps(step_result.step)
            return False  # never stop a row early: end_token does that

        results = self.generator.generate_batch(
            [[self.vocabulary[i] for i in row] for row in ids.tolist()], max_length=max_new_tokens,
            include_prompt_in_result=False, beam_size=1, callback=stamp,
            end_token=[] if eos_token_id is None else [eos_token_id], return_end_token=True, **sampling)
        return assemble(input_ids, [r.sequences_ids[0] for r in results], eos_token_id).to(input_ids.device)

    def encode(self, text: str) -> list[int]:
        """Token strings of the tokenizer shipped in the export, as ids through CTranslate2's vocabulary."""
        import tokenizers

        if not hasattr(self, "_tokenizer"):
            self._tokenizer = tokenizers.Tokenizer.from_file(str(self.directory / "tokenizer.json"))
            self._tokenizer.encode_special_tokens = True  # as Ryzen's Tokenizer: "<|endoftext|>" in text is text
            self._ids = {token: i for i, token in enumerate(self.vocabulary)}
        return [self._ids[t] for t in self._tokenizer.encode(text, add_special_tokens=False).tokens]
