"""FTZ/DAZ must reach the worker threads that run torch's kernels, not just the caller."""
import torch

from ryzen_plugin_kernel_simd.denormals import set_flush_denormal_all_threads


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
