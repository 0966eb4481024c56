"""Measured GEMM rates and read bandwidth: the cache, its key and the shape of the results (tiny sizes;
nothing here depends on how fast the machine is)."""
import json

import pytest
import torch

from ryzen_core import hardware_limits as hw
from ryzen_core import native_bf16


def fail_if_measured(*args, **kwargs):
    raise AssertionError("measured again instead of reading the cache")


def test_gemm_rates_are_measured_once_per_signature(tmp_path, monkeypatch):
    rates = hw.gemm_rates(tmp_path, n=32)
    assert rates["fp32"]["flops"] > 0 and rates["fp32"]["n"] == 32 and rates["threads"] == torch.get_num_threads()
    assert (rates["bf16"] is not None) == native_bf16()
    stored = json.loads(hw.cache_path(tmp_path).read_text())
    assert stored["signature"]["torch"] == torch.__version__ and stored["gemm"]["fp32:32"] == rates["fp32"]

    monkeypatch.setattr(hw, "measure_gemm", fail_if_measured)
    assert hw.gemm_rates(tmp_path, n=32)["fp32"] == rates["fp32"]  # from the cache

    real_signature = hw.signature
    monkeypatch.setattr(hw, "signature", lambda: dict(real_signature(), torch="9.9"))
    with pytest.raises(AssertionError, match="measured again"):  # another torch is another file
        hw.gemm_rates(tmp_path, n=32)


def test_bf16_is_not_measured_without_native_bf16(tmp_path, monkeypatch):
    monkeypatch.setattr(hw, "native_bf16", lambda: False)
    rates = hw.gemm_rates(tmp_path, n=16)
    assert rates["bf16"] is None and rates["fp32"]["flops"] > 0


def test_read_bandwidth_is_cached_per_working_set(tmp_path, monkeypatch):
    small = hw.read_bandwidth_gbs(64 * 1024, cache_dir=tmp_path)
    assert isinstance(small, float) and small > 0
    hw.read_bandwidth_gbs(256 * 1024, cache_dir=tmp_path)
    stored = json.loads(hw.cache_path(tmp_path).read_text())["read_bandwidth"]
    assert set(stored) == {str(64 * 1024), str(256 * 1024)} and stored[str(64 * 1024)]["bytes"] == 64 * 1024

    monkeypatch.setattr(hw, "measure_read_bandwidth", fail_if_measured)
    assert hw.read_bandwidth_gbs(64 * 1024, cache_dir=tmp_path) == small
    hw.cache_path(tmp_path).write_text("{ truncated")  # an unreadable cache is a miss, not an error
    with pytest.raises(AssertionError, match="measured again"):
        hw.read_bandwidth_gbs(64 * 1024, cache_dir=tmp_path)


def test_cache_follows_ryzen_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("RYZEN_CACHE_DIR", str(tmp_path))
    hw.read_bandwidth_gbs(4096)
    assert hw.cache_path().parent == tmp_path / "hardware" and hw.cache_path().exists()
    with pytest.raises(ValueError, match="working set"):
        hw.measure_read_bandwidth(2)


def test_utilization_against_computed_peak_and_measured_rate():
    peak = {"fp32_flops": 200e9, "bf16_flops": 800e9}
    u = hw.utilization(100e9, peak, {"fp32": {"flops": 400e9}, "bf16": None})
    assert u["of_computed_fp32_peak"] == 0.5 and u["of_computed_bf16_peak"] == 0.125
    assert u["of_measured_fp32_gemm"] == 0.25 and u["of_measured_bf16_gemm"] is None
