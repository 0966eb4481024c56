"""Detection from /proc/cpuinfo text.

data/cpuinfo_xeon_amx_kvm.txt is this project's development machine, captured as is. The other
two are written in the format Linux uses, with the flag lists those parts report: an AMD Zen 4
EPYC (AVX-512 with BF16 and VNNI, no AMX) and a Haswell Xeon (AVX2 only, two threads per core).
"""
from pathlib import Path

import pytest

from ryzen_plugin_kernel_simd.cpu import CpuFeatures, detect, physical_cores_from_proc_cpuinfo

DATA = Path(__file__).parent / "data"


def captured(name: str) -> str:
    return (DATA / name).read_text()


def test_zen4_has_avx512_bf16_without_amx():
    cpu = detect(captured("cpuinfo_epyc_zen4.txt"))
    assert cpu.model == "AMD EPYC 9R14 96-Core Processor"
    assert cpu.features["avx512f"] and cpu.features["avx512_vnni"] and cpu.features["avx512_bf16"]
    assert not cpu.features["amx_bf16"]
    assert cpu.native_bf16 and cpu.bf16_unit == "AVX-512 BF16"
    assert cpu.physical_cores == 2
    assert cpu.caches == {"last_level_bytes": 1024 * 1024}


def test_haswell_has_avx2_only_and_counts_physical_cores_not_threads():
    cpu = detect(captured("cpuinfo_xeon_haswell.txt"))
    assert cpu.features["avx2"] and cpu.features["fma"]
    assert not any(cpu.features[f] for f in ("avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "amx_bf16"))
    assert not cpu.native_bf16 and cpu.bf16_unit is None
    assert cpu.physical_cores == 2  # four processors, two core ids


def test_amx_machine():
    cpu = detect(captured("cpuinfo_xeon_amx_kvm.txt"))
    assert cpu.features["amx_bf16"] and cpu.features["amx_int8"] and cpu.bf16_unit == "AMX-BF16"


def test_mask_hides_features_and_changes_the_signature():
    text = captured("cpuinfo_epyc_zen4.txt")
    plain, masked = detect(text), detect(text, mask=["avx512_bf16"])
    assert not masked.native_bf16
    assert plain.signature() != masked.signature()
    assert "avx512_bf16" in plain.signature()["features"]


def test_physical_cores_unknown_without_core_ids():
    assert physical_cores_from_proc_cpuinfo("processor : 0\nflags : avx2\n") is None


@pytest.mark.parametrize("flags", [["avx512bf16"], ["avx512_bf16"]])
def test_flag_spellings(flags):
    from ryzen_plugin_kernel_simd.cpu import parse_flags

    assert parse_flags(flags)["avx512_bf16"]


def test_live_detection_agrees_with_torch():
    cpu = detect()
    assert isinstance(cpu, CpuFeatures) and cpu.usable_cores >= 1
    # torch's dispatch level cannot exceed what the OS reports
    if cpu.torch_capability.startswith("AVX512"):
        assert cpu.features["avx512f"]
