"""CTranslate2, the engine CI exercises: conversion, the backend contract, tokenizer identity, a fresh process."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from ryzen_core import Backend, ExportResult, lm_logits, quality_class
from ryzen_core.testing import make_host
from ryzen_plugin_runtimes import plugin
from ryzen_plugin_runtimes.plugin import load_backend
from ryzen_plugin_runtimes.texts import IDENTITY_TEXTS

pytest.importorskip("ctranslate2",
                    reason="ctranslate2 is not installed (pip install 'ryzen-plugin-runtimes[ctranslate2]')")


def run_on_export(model, tokenizer, export_dir, **settings):
    """on_export through the plugin host, as the core calls it."""
    host = make_host({"runtimes": plugin})
    host.settings["runtimes"] = plugin.RuntimesSettings(**settings)
    results = host.call_each("on_export", ["runtimes"], fallback=False, model=model, tokenizer=tokenizer,
                             export_dir=export_dir, config=None)
    return results["runtimes"], host.events


@pytest.fixture(scope="module", params=["builtin", "llama"])
def exported(request, tokenizer, tmp_path_factory):
    model = request.getfixturevalue(f"{request.param}_model")
    result, events = run_on_export(model, tokenizer, tmp_path_factory.mktemp("export"), engines=["ctranslate2"])
    return model, result, events


def test_on_export_builds_both_precisions_and_records_them(exported):
    _, result, events = exported
    assert isinstance(result, ExportResult)
    assert sorted(result.exports) == ["ctranslate2-float32", "ctranslate2-int8"]
    assert result.backends == {}  # each export is loaded where it is measured, from its directory
    details = result.details
    assert details["sizes_bytes"]["ctranslate2-int8"] < details["sizes_bytes"]["ctranslate2-float32"]
    assert details["parity"]["ctranslate2-float32"]["max_abs_logit_diff"] < 1e-4
    assert all(t["identical"] for t in details["tokenizer"].values())
    recorded = {e.data["export"] for e in events if e.event == "export"}
    assert recorded == set(result.exports)
    report = json.loads(json.dumps(result.report()))  # all of it goes into the JSON report
    assert report["exports"]["ctranslate2-int8"] == str(result.exports["ctranslate2-int8"])
    assert report["skipped"] == {} and report["parity"] == details["parity"]


def test_float32_matches_torch_logits_and_greedy_tokens(exported, follows_torch):
    model, result, _ = exported
    backend = load_backend(result.exports["ctranslate2-float32"])
    assert isinstance(backend, Backend) and backend.name == "ctranslate2-float32"
    follows_torch(backend, model, atol=1e-4, new_tokens=12)


def test_int8_stays_close_to_torch(exported, prompts):
    model, result, _ = exported
    backend = load_backend(result.exports["ctranslate2-int8"])
    with torch.inference_mode():
        expected = lm_logits(model, prompts)
    got = backend.logits(prompts)
    assert (got - expected).abs().max() < 0.1 * expected.abs().max()
    assert (got.argmax(-1) == expected.argmax(-1)).float().mean() >= 0.8


def test_backends_state_their_precision_and_weight_bytes(exported):
    """What the core's runtime table groups and bounds by."""
    _, result, _ = exported
    float32, int8 = (load_backend(result.exports[f"ctranslate2-{p}"]) for p in ("float32", "int8"))
    assert (quality_class(float32.precision), quality_class(int8.precision)) == ("fp32-exact", "8-bit")
    assert 0 < int8.weight_bytes < float32.weight_bytes


def test_generation_stops_at_eos_and_pads_finished_rows(exported, prompts):
    _, result, _ = exported
    backend = load_backend(result.exports["ctranslate2-float32"])
    free = backend.generate(prompts, 8)
    eos = int(free[0, prompts.shape[1] + 2])  # row 0's third new token
    stopped = backend.generate(prompts, 8, eos_token_id=eos)
    row0 = stopped[0, prompts.shape[1]:].tolist()
    first = row0.index(eos)
    assert first <= 2 and all(t == eos for t in row0[first:])
    assert torch.equal(stopped[0, : prompts.shape[1] + first + 1], free[0, : prompts.shape[1] + first + 1])


def test_sampling_returns_the_requested_tokens(exported, prompts, tokenizer):
    """CTranslate2 samples with its own random generator (seeded from `generator`, though it does not promise
    repeatable draws), so only the contract is checked here."""
    _, result, _ = exported
    backend = load_backend(result.exports["ctranslate2-float32"])
    out = backend.generate(prompts, 10, temperature=1.5, top_k=20, generator=torch.Generator().manual_seed(3))
    assert out.shape == (2, prompts.shape[1] + 10) and torch.equal(out[:, : prompts.shape[1]], prompts)
    assert 0 <= int(out.min()) and int(out.max()) < tokenizer.vocab_size


def test_tokenizer_identity_on_the_fixed_texts(exported, tokenizer):
    _, result, _ = exported
    for path in result.exports.values():
        backend = load_backend(path)
        for text in IDENTITY_TEXTS:
            assert backend.encode(text) == tokenizer.encode(text), text


def test_context_length_is_checked(exported, builtin_model):
    model, result, _ = exported
    backend = load_backend(result.exports["ctranslate2-float32"])
    if model is not builtin_model:  # rotary positions extrapolate: no hard limit to enforce
        assert backend.context_length is None
        return
    prompt = torch.zeros((1, model.config.context_length - 2), dtype=torch.long)
    with pytest.raises(ValueError, match="exceeds the model's context_length"):
        backend.generate(prompt, 3)


def test_backend_builds_in_a_fresh_process_from_the_path_alone(exported, prompts):
    """What a validation worker does: a new interpreter, the export path, nothing else."""
    model, result, _ = exported
    path = str(result.exports["ctranslate2-int8"])
    script = ("import json, sys, torch\n"
              "from ryzen_plugin_runtimes.plugin import load_backend\n"
              "backend = load_backend(sys.argv[1])\n"
              "ids = torch.tensor(json.loads(sys.argv[2]))\n"
              "print(json.dumps([backend.name, backend.generate(ids, 6).tolist()]))\n")
    done = subprocess.run([sys.executable, "-c", script, path, json.dumps(prompts.tolist())], capture_output=True,
                          text=True, timeout=1800)  # generous: only a hang should trip it
    assert done.returncode == 0, done.stderr[-2000:]
    name, ids = json.loads(done.stdout.strip().splitlines()[-1])
    assert name == "ctranslate2-int8"
    assert torch.equal(torch.tensor(ids), load_backend(path).generate(prompts, 6))
