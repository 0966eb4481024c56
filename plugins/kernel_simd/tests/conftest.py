"""A tiny model, a config and CPU descriptions for the kernel plugin's tests."""
from __future__ import annotations

import pytest
import torch

from ryzen_core import PRESETS, CpuFeatures, RunConfig, Transformer, TransformerConfig

ALL = {"avx2": True, "fma": True, "avx512f": True, "avx512bw": True, "avx512_vnni": True,
       "avx512_bf16": True, "amx_bf16": False, "amx_int8": False}


@pytest.fixture
def make_cpu():
    def make(native_bf16: bool = True, usable: int = 2, physical: int | None = 2) -> CpuFeatures:
        features = dict(ALL, avx512_bf16=native_bf16)
        return CpuFeatures(model="test CPU", logical_cores=usable, usable_cores=usable, physical_cores=physical,
                           features=features, torch_capability="AVX512")

    return make


@pytest.fixture
def tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return Transformer(TransformerConfig(**dict(PRESETS["tiny"], dropout=0.0)))


@pytest.fixture
def config(tmp_path) -> RunConfig:
    """A small batch shape; train.precision auto, so precision is the kernel's to choose (as threads are)."""
    cfg = RunConfig()
    cfg.train.batch_size, cfg.data.seq_len, cfg.data.cache_dir = 2, 16, tmp_path / "cache"
    cfg.train.precision = "auto"
    return cfg


@pytest.fixture
def break_compile(monkeypatch):
    """Make torch.compile return a function that raises `message` when called; counts the calls."""
    calls = {"compiled": 0}

    def install(message: str):
        def broken_compile(fn):
            def compiled(*args):
                calls["compiled"] += 1
                raise RuntimeError(message)
            return compiled

        monkeypatch.setattr(torch, "compile", broken_compile)
        return calls

    return install
