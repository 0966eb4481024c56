"""FTZ/DAZ must reach the worker threads that run torch's kernels, not just the caller."""
from pathlib import Path

import pytest
import torch

from ryzen_plugin_kernel_simd.denormals import _loaded_libgomp, set_flush_denormal_all_threads


def subnormal_products() -> torch.Tensor:
    # 4M elements: large enough that torch splits the multiply across all intra-op threads
    return torch.full((1 << 22,), 1e-30) * torch.full((1 << 22,), 1e-10)  # 1e-40 is subnormal in fp32


def test_flush_reaches_every_thread_and_is_undone():
    try:
        info = set_flush_denormal_all_threads(True)
        assert info["flush_denormal"]
        if torch.get_num_threads() > 1:
            assert info["reached"].startswith(f"{torch.get_num_threads()} threads")
        assert (subnormal_products() == 0).all()
    finally:
        set_flush_denormal_all_threads(False)
    assert (subnormal_products() > 0).all()


def test_flush_reaches_torchs_threads_when_another_libgomp_is_loaded_first(monkeypatch):
    """CTranslate2's wheel ships its own libgomp; a parallel region opened there sets other threads."""
    import ctypes

    ctranslate2_libs = list(Path(torch.__file__).resolve().parents[1].glob("ctranslate2.libs/libgomp*"))
    if not ctranslate2_libs:
        pytest.skip("no second libgomp installed (ctranslate2 brings one)")
    ctypes.CDLL(str(ctranslate2_libs[0]))
    test_flush_reaches_every_thread_and_is_undone()


def test_torchs_libgomp_is_chosen_whatever_the_map_order():
    torch_lib = Path(torch.__file__).resolve().parent / "lib" / "libgomp.so.1"
    maps = "\n".join(f"7f00{i}000-7f00{i}fff r-xp 00000000 08:01 1 {path}" for i, path in
                     enumerate(["/site/ctranslate2.libs/libgomp-e985bcbb.so.1.0.0", str(torch_lib)]))
    assert _loaded_libgomp(maps) == str(torch_lib)
    assert _loaded_libgomp("7f00-7f01 r-xp 0 08:01 1 /usr/lib/libgomp.so.1") == "/usr/lib/libgomp.so.1"
    assert _loaded_libgomp("") is None
