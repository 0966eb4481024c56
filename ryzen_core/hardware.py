"""What this CPU can do, decided in one place: its ISA features (AVX2/FMA, AVX-512, VNNI, native
bf16 on AVX-512 BF16 or AMX), its cores and caches, and the peak FLOP/s computed from them.

Detected, never assumed: the flags are the OS's view (py-cpuinfo, which reads /proc/cpuinfo on
Linux; /proc/cpuinfo itself if py-cpuinfo finds none), physical cores are counted in /proc/cpuinfo,
and torch's own dispatch level and oneDNN are recorded beside them. `cpu_features()` reads the live
CPU once per process (py-cpuinfo starts a subprocess, about 1 s); `detect(proc_cpuinfo=text)`
parses a captured /proc/cpuinfo, which is how the tests cover CPUs this machine is not. A `mask`
hides features, to exercise the fallbacks on a CPU that has them.

What the machine measurably does (matmul rate per dtype, read bandwidth) is `hardware_limits`:
the computed peak here assumes a clock and a number of FMA units, the measured rate does not.
"""
from __future__ import annotations

import functools
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch

from .errors import ConfigError

# Flag spellings differ between kernels and tools (Linux: avx512_vnni; CPUID-based tools: avx512vnni).
FEATURES: dict[str, tuple[str, ...]] = {
    "avx2": ("avx2",),
    "fma": ("fma",),
    "avx512f": ("avx512f",),
    "avx512bw": ("avx512bw",),
    "avx512_vnni": ("avx512_vnni", "avx512vnni"),
    "avx_vnni": ("avx_vnni", "avxvnni"),
    "avx512_bf16": ("avx512_bf16", "avx512bf16"),
    "amx_tile": ("amx_tile",),
    "amx_bf16": ("amx_bf16",),
    "amx_int8": ("amx_int8",),
}
FMA_UNITS = 2
"""FMA units per core are not visible from software; 2 holds for current AVX-512 and AVX2 server cores."""
AMX_BF16_FLOPS_PER_CYCLE = 1024  # one AMX tile unit: 16x32 bf16 dot products per cycle (Intel's figure)


@dataclass(frozen=True)
class CpuFeatures:
    model: str
    logical_cores: int
    usable_cores: int
    physical_cores: int | None = None
    features: dict[str, bool] = field(default_factory=dict)
    caches: dict[str, int] = field(default_factory=dict)
    """Live: bytes per instance as core 0 sees them (l1d_bytes, l2_bytes, l3_bytes; the L3 is shared by several
    cores). From /proc/cpuinfo text: Linux's one `cache size` line (cache_size_bytes: the L2 on AMD, the L3 on Intel)."""
    clock_hz: float = 0.0
    """py-cpuinfo's current (else advertised) clock, or /proc/cpuinfo's `cpu MHz`; 0 when not reported."""
    torch_capability: str = ""
    mkldnn: bool = False

    def has(self, name: str) -> bool:
        return self.features.get(name, False)

    @property
    def present(self) -> list[str]:
        """The features this CPU has, sorted."""
        return sorted(name for name, on in self.features.items() if on)

    @property
    def amx(self) -> bool:
        """Intel's matrix unit: the tile registers, enabled by the OS (Linux hides the flags otherwise)."""
        return self.has("amx_tile")

    @property
    def bf16_unit(self) -> str | None:
        if self.amx and self.has("amx_bf16"):
            return "AMX-BF16"
        return "AVX-512 BF16" if self.has("avx512_bf16") else None

    @property
    def native_bf16(self) -> bool:
        """bf16 arithmetic in hardware; elsewhere bf16 is emulated and slower than fp32."""
        return self.bf16_unit is not None

    @property
    def int8_unit(self) -> str | None:
        """Where int8 dot products run (what quantized matmuls use)."""
        if self.amx and self.has("amx_int8"):
            return "AMX-INT8"
        if self.has("avx512_vnni"):
            return "AVX-512 VNNI"
        return "AVX-VNNI" if self.has("avx_vnni") else None

    @property
    def vnni(self) -> bool:
        return self.has("avx512_vnni") or self.has("avx_vnni")

    def as_dict(self) -> dict:
        return dict(asdict(self), native_bf16=self.native_bf16, bf16_unit=self.bf16_unit, vnni=self.vnni,
                    int8_unit=self.int8_unit, amx=self.amx)

    def signature(self) -> dict:
        """What decides which execution strategy wins: the part, its features, and the cores we may use."""
        return {"model": self.model, "usable_cores": self.usable_cores, "features": self.present,
                "torch_capability": self.torch_capability}


def parse_flags(flags: Iterable[str]) -> dict[str, bool]:
    present = {f.lower() for f in flags}
    return {name: any(a in present for a in aliases) for name, aliases in FEATURES.items()}


def physical_cores_from_proc_cpuinfo(text: str) -> int | None:
    """Distinct (physical id, core id) pairs; None where the kernel does not report them (some VMs, ARM)."""
    cores, physical = set(), "0"
    for line in text.splitlines():
        key, _, value = (part.strip() for part in line.partition(":"))
        if key == "physical id":
            physical = value
        elif key == "core id":
            cores.add((physical, value))
    return len(cores) or None


def _proc_field(text: str, *keys: str) -> str | None:
    """The first value of any of `keys` in /proc/cpuinfo text."""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in keys:
            return value.strip()
    return None


def flags_from_proc_cpuinfo(text: str) -> list[str]:
    return (_proc_field(text, "flags", "Features") or "").split()


def usable_cores() -> int:
    """The cores this process may run on (its affinity), which a container or taskset may limit."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


@functools.lru_cache(maxsize=1)
def cpu_info() -> dict[str, Any]:
    """py-cpuinfo's view of this CPU, read once per process: each read starts a subprocess (about 1 s)."""
    import cpuinfo

    return cpuinfo.get_cpu_info()


def _read_proc_cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux
        return ""


SIZE_UNITS = {"K": 1024, "M": 1024 ** 2, "G": 1024 ** 3}
TORCH_CACHE_KEYS = {"l1d_bytes": "l1d_cache_size", "l2_bytes": "l2_cache_size", "l3_bytes": "l3_cache_size"}


def live_caches() -> dict[str, int]:
    """Per-instance cache sizes from sysfs (Linux), else from torch's cpuinfo. Not py-cpuinfo's: it sums
    L1 and L2 over the cores and reports the L2 of one core as the L3."""
    caches: dict[str, int] = {}
    for index in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        try:
            level, kind, size = ((index / name).read_text().strip() for name in ("level", "type", "size"))
        except OSError:
            continue
        if kind in ("Data", "Unified") and size[:-1].isdigit() and size[-1:] in SIZE_UNITS:
            caches[f"l{level}{'d' if kind == 'Data' else ''}_bytes"] = int(size[:-1]) * SIZE_UNITS[size[-1]]
    if caches:
        return caches
    reported = torch.cpu.get_capabilities()
    return {name: int(reported[key]) for name, key in TORCH_CACHE_KEYS.items() if reported.get(key)}


def _check_mask(mask: Iterable[str]) -> tuple[str, ...]:
    names = tuple(sorted(set(mask)))
    unknown = [name for name in names if name not in FEATURES]
    if unknown:
        raise ConfigError(f"cannot mask unknown CPU feature(s) {', '.join(unknown)}; known: {', '.join(FEATURES)}")
    return names


def detect(proc_cpuinfo: str | None = None, mask: Iterable[str] = ()) -> CpuFeatures:
    """This CPU (or the one a captured /proc/cpuinfo describes), with the features in `mask` hidden."""
    masked = _check_mask(mask)
    if proc_cpuinfo is None:
        info, text = cpu_info(), _read_proc_cpuinfo()
        flags = info.get("flags") or flags_from_proc_cpuinfo(text)
        model = info.get("brand_raw") or _proc_field(text, "model name") or "unknown"
        caches = live_caches()
        clock = float((info.get("hz_actual") or info.get("hz_advertised") or [0])[0])
    else:
        text, flags = proc_cpuinfo, flags_from_proc_cpuinfo(proc_cpuinfo)
        model = _proc_field(text, "model name") or "unknown"
        size, mhz = (_proc_field(text, "cache size") or "").split(), _proc_field(text, "cpu MHz")
        caches = {"cache_size_bytes": int(size[0]) * 1024} if size and size[0].isdigit() else {}  # stated in KB
        clock = float(mhz) * 1e6 if mhz else 0.0
    features = parse_flags(flags)
    features.update(dict.fromkeys(masked, False))
    return CpuFeatures(model=model, logical_cores=os.cpu_count() or 1, usable_cores=usable_cores(),
                       physical_cores=physical_cores_from_proc_cpuinfo(text), features=features, caches=caches,
                       clock_hz=clock, torch_capability=torch.backends.cpu.get_cpu_capability(),
                       mkldnn=torch.backends.mkldnn.is_available())


def cpu_features(mask: Iterable[str] = ()) -> CpuFeatures:
    """The live CPU's features (cached per mask; the CPU does not change while a process runs)."""
    return _live(_check_mask(mask))


@functools.lru_cache(maxsize=None)
def _live(mask: tuple[str, ...]) -> CpuFeatures:
    return detect(mask=mask)


def native_bf16() -> bool:
    """Whether this CPU does bf16 arithmetic in hardware (AVX-512 BF16 or AMX-BF16): what `precision: auto`
    and every other "use bf16 here?" decision asks."""
    return cpu_features().native_bf16


def peak_flops(cpu: CpuFeatures | None = None) -> dict[str, Any]:
    """Theoretical peak FLOP/s of the cores this process may use, fp32 and bf16, with the assumptions:
    usable cores x clock x FLOPs per cycle, FLOPs per cycle from the widest vector unit the CPU reports."""
    cpu = cpu or cpu_features()
    lanes = 16 if cpu.has("avx512f") else 8 if cpu.has("avx2") else 4
    fp32_per_cycle = 2 * lanes * FMA_UNITS  # an FMA is 2 FLOPs per lane
    if cpu.bf16_unit == "AMX-BF16":
        bf16_per_cycle, bf16_unit = AMX_BF16_FLOPS_PER_CYCLE, "AMX-BF16"
    elif cpu.bf16_unit == "AVX-512 BF16":
        bf16_per_cycle, bf16_unit = 2 * fp32_per_cycle, "AVX-512 BF16 (vdpbf16ps: 2 products per fp32 lane)"
    else:
        bf16_per_cycle, bf16_unit = fp32_per_cycle, "none (bf16 runs at the fp32 rate at best)"
    cores, hz = cpu.usable_cores, cpu.clock_hz
    return {
        "cores": cores, "clock_hz": hz, "vector_lanes_fp32": lanes, "fma_units_assumed": FMA_UNITS,
        "fp32_flops": cores * hz * fp32_per_cycle, "bf16_flops": cores * hz * bf16_per_cycle,
        "bf16_unit": bf16_unit,
        "formula": "cores x clock x FLOPs/cycle; fp32 FLOPs/cycle = 2 (FMA) x lanes x FMA units",
    }


def cpu_description() -> dict[str, Any]:
    """The CPU section of a report's environment."""
    cpu, info = cpu_features(), cpu_info()
    return {"model": cpu.model, "vendor": info.get("vendor_id_raw"), "arch": info.get("arch"),
            "logical_cores": cpu.logical_cores, "usable_cores": cpu.usable_cores, "flags": cpu.present}
