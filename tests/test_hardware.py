"""What this CPU can do (`ryzen_core.hardware`): detection from /proc/cpuinfo text, the decisions
built on it (native bf16, VNNI, AMX, the computed peak) and the live CPU checked against torch.

data/cpuinfo_xeon_amx_kvm.txt is this project's development machine, captured as is. The other
two are written in the format Linux uses, with the flag lists those parts report: an AMD Zen 4
EPYC (AVX-512 with BF16 and VNNI, no AMX) and a Haswell Xeon (AVX2 only, two threads per core).
"""
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import ryzen_core
from ryzen_core import ConfigError, CpuFeatures, cpu_features, hardware, native_bf16, peak_flops
from ryzen_core.hardware import detect, parse_flags, physical_cores_from_proc_cpuinfo

DATA = Path(__file__).parent / "data"


def captured(name: str) -> str:
    return (DATA / name).read_text()


def test_zen4_has_avx512_bf16_and_vnni_without_amx():
    cpu = detect(captured("cpuinfo_epyc_zen4.txt"))
    assert cpu.model == "AMD EPYC 9R14 96-Core Processor"
    assert cpu.features["avx512f"] and cpu.features["avx512_vnni"] and cpu.features["avx512_bf16"]
    assert not cpu.features["amx_bf16"] and not cpu.amx
    assert cpu.native_bf16 and cpu.bf16_unit == "AVX-512 BF16"
    assert cpu.vnni and cpu.int8_unit == "AVX-512 VNNI"
    assert cpu.physical_cores == 2
    assert cpu.caches == {"cache_size_bytes": 1024 * 1024}  # Linux's `cache size` line: the L2 on AMD


def test_haswell_has_avx2_only_and_counts_physical_cores_not_threads():
    cpu = detect(captured("cpuinfo_xeon_haswell.txt"))
    assert cpu.features["avx2"] and cpu.features["fma"]
    assert not any(cpu.features[f] for f in ("avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "amx_bf16"))
    assert not cpu.native_bf16 and cpu.bf16_unit is None
    assert not cpu.vnni and cpu.int8_unit is None
    assert cpu.physical_cores == 2  # four processors, two core ids


def test_amx_machine():
    cpu = detect(captured("cpuinfo_xeon_amx_kvm.txt"))
    assert cpu.features["amx_bf16"] and cpu.features["amx_int8"] and cpu.amx
    assert cpu.bf16_unit == "AMX-BF16" and cpu.int8_unit == "AMX-INT8"
    assert cpu.features["avx_vnni"] and cpu.vnni
    assert cpu.clock_hz == 2.0e9  # its `cpu MHz` line


def test_mask_hides_features_and_changes_the_signature():
    text = captured("cpuinfo_epyc_zen4.txt")
    plain, masked = detect(text), detect(text, mask=["avx512_bf16"])
    assert not masked.native_bf16
    assert plain.signature() != masked.signature()
    assert "avx512_bf16" in plain.signature()["features"]


def test_masking_amx_tile_hides_the_matrix_unit():
    cpu = detect(captured("cpuinfo_xeon_amx_kvm.txt"), mask=["amx_tile"])
    assert not cpu.amx and cpu.bf16_unit == "AVX-512 BF16" and cpu.int8_unit == "AVX-512 VNNI"


def test_masking_an_unknown_feature_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown CPU feature.*avx512bf16x"):
        detect(captured("cpuinfo_epyc_zen4.txt"), mask=["avx512bf16x"])
    with pytest.raises(ConfigError, match="unknown CPU feature"):
        cpu_features(mask=["sse9"])


def test_physical_cores_unknown_without_core_ids():
    assert physical_cores_from_proc_cpuinfo("processor : 0\nflags : avx2\n") is None


@pytest.mark.parametrize(("flags", "feature"), [(["avx512bf16"], "avx512_bf16"), (["avx512_bf16"], "avx512_bf16"),
                                                (["avx512vnni"], "avx512_vnni"), (["avxvnni"], "avx_vnni"),
                                                (["AVX2"], "avx2")])
def test_flag_spellings(flags, feature):
    parsed = parse_flags(flags)
    assert parsed[feature] and sum(parsed.values()) == 1


@pytest.mark.parametrize(("name", "lanes", "bf16_per_fp32"), [("cpuinfo_xeon_amx_kvm.txt", 16, 1024 / 64),
                                                               ("cpuinfo_epyc_zen4.txt", 16, 2),
                                                               ("cpuinfo_xeon_haswell.txt", 8, 1)])
def test_peak_flops_follows_the_widest_unit_the_cpu_reports(name, lanes, bf16_per_fp32):
    cpu = replace(detect(captured(name)), clock_hz=2.0e9, usable_cores=4)
    peak = peak_flops(cpu)
    assert peak["vector_lanes_fp32"] == lanes
    assert peak["fp32_flops"] == 4 * 2.0e9 * 2 * lanes * peak["fma_units_assumed"]
    assert peak["bf16_flops"] == peak["fp32_flops"] * bf16_per_fp32


def test_live_cpu_is_read_once_per_mask():
    cpu = cpu_features()
    assert cpu is cpu_features() and cpu_features(mask=["fma", "avx2"]) is cpu_features(mask=["avx2", "fma"])
    assert not cpu_features(mask=["avx2"]).features["avx2"]
    assert native_bf16() == cpu.native_bf16 and peak_flops() == peak_flops(cpu)


def test_live_detection_agrees_with_torch():
    """Two detectors, the OS's flags and torch's cpuinfo (CPUID and the OS-enabled register state), must agree
    on every feature both know: a disagreement means one of them is wrong about this machine."""
    cpu = cpu_features()
    assert isinstance(cpu, CpuFeatures) and 1 <= cpu.usable_cores <= cpu.logical_cores
    torch_names = {"avx2": "avx2", "fma": "fma3", "avx512f": "avx512_f", "avx512bw": "avx512_bw",
                   "avx512_vnni": "avx512_vnni", "avx_vnni": "avx_vnni", "avx512_bf16": "avx512_bf16",
                   "amx_tile": "amx_tile", "amx_bf16": "amx_bf16", "amx_int8": "amx_int8"}
    reported = torch.cpu.get_capabilities()
    if "avx2" not in reported:
        pytest.skip(f"torch reports no x86 features here ({reported.get('architecture')})")
    assert {ours: cpu.features[ours] for ours in torch_names} == {ours: reported[theirs]
                                                                  for ours, theirs in torch_names.items()}
    if cpu.torch_capability.startswith("AVX512"):  # torch's dispatch level cannot exceed what the OS reports
        assert cpu.features["avx512f"]


def test_live_caches_are_per_instance_and_ordered():
    caches = cpu_features().caches
    sizes = [caches[key] for key in ("l1d_bytes", "l2_bytes", "l3_bytes") if key in caches]
    assert sizes == sorted(sizes) and all(size >= 1024 for size in sizes)


def test_the_environment_lists_the_detected_features():
    described = hardware.cpu_description()
    assert described["flags"] == cpu_features().present and described["usable_cores"] == cpu_features().usable_cores


def test_hardware_is_public_from_the_package():
    assert ryzen_core.hardware is hardware
    assert {"hardware", "cpu_features", "native_bf16", "peak_flops", "CpuFeatures"} <= set(ryzen_core.__all__)
