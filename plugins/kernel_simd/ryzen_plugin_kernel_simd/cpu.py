"""CPU feature detection: the OS's view (py-cpuinfo, /proc/cpuinfo) cross-checked with torch's.

`detect()` reads the live CPU; `detect(proc_cpuinfo=text)` parses a captured /proc/cpuinfo,
which is how the tests cover CPUs this machine is not. `signature()` is what the autotuning
cache is keyed by: the same model on a CPU with other features must be tuned again.
"""
from __future__ import annotations

import functools
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable

import torch

# cpuinfo flag spellings differ between kernels and tools; each feature lists its aliases.
FEATURES = {
    "avx2": ("avx2",),
    "fma": ("fma",),
    "avx512f": ("avx512f",),
    "avx512bw": ("avx512bw",),
    "avx512_vnni": ("avx512_vnni", "avx512vnni"),
    "avx512_bf16": ("avx512_bf16", "avx512bf16"),
    "amx_bf16": ("amx_bf16",),
    "amx_int8": ("amx_int8",),
}


@dataclass
class CpuFeatures:
    model: str
    logical_cores: int
    usable_cores: int
    physical_cores: int | None = None
    features: dict[str, bool] = field(default_factory=dict)
    caches: dict[str, int] = field(default_factory=dict)
    torch_capability: str = ""
    mkldnn: bool = False

    @property
    def native_bf16(self) -> bool:
        return self.features.get("avx512_bf16", False) or self.features.get("amx_bf16", False)

    @property
    def bf16_unit(self) -> str | None:
        if self.features.get("amx_bf16"):
            return "AMX-BF16"
        return "AVX-512 BF16" if self.features.get("avx512_bf16") else None

    def as_dict(self) -> dict:
        return dict(asdict(self), native_bf16=self.native_bf16)

    def signature(self) -> dict:
        """What decides which execution strategy wins: the part, its features, and the cores we may use."""
        return {"model": self.model, "usable_cores": self.usable_cores,
                "features": sorted(k for k, v in self.features.items() if v), "torch_capability": self.torch_capability}


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


def flags_from_proc_cpuinfo(text: str) -> list[str]:
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return value.split()
    return []


CACHE_KEYS = {"l1d_bytes": "l1_data_cache_size", "l2_bytes": "l2_cache_size", "l3_bytes": "l3_cache_size"}


@functools.lru_cache(maxsize=1)
def _live_cpu() -> tuple[list[str], str, dict[str, int], int | None]:
    from ryzen_core.report import cpu_info  # read once per process, shared with the core

    info = cpu_info()
    caches = {name: int(info[key]) for name, key in CACHE_KEYS.items() if info.get(key)}
    try:
        physical = physical_cores_from_proc_cpuinfo(Path("/proc/cpuinfo").read_text())
    except OSError:
        physical = None
    return list(info.get("flags", [])), info.get("brand_raw", "unknown"), caches, physical


def detect(proc_cpuinfo: str | None = None, mask: Iterable[str] = ()) -> CpuFeatures:
    """Detect this CPU (or parse a captured /proc/cpuinfo); `mask` hides features, to test fallbacks."""
    if proc_cpuinfo is None:
        flags, model, caches, physical = _live_cpu()
    else:
        flags = flags_from_proc_cpuinfo(proc_cpuinfo)
        model = next((l.split(":", 1)[1].strip() for l in proc_cpuinfo.splitlines() if l.startswith("model name")),
                     "unknown")
        physical = physical_cores_from_proc_cpuinfo(proc_cpuinfo)
        caches = {}
        size = next((l.split(":", 1)[1].split() for l in proc_cpuinfo.splitlines() if l.startswith("cache size")), None)
        if size and size[0].isdigit():
            caches["last_level_bytes"] = int(size[0]) * 1024  # /proc/cpuinfo states it in KB
    features = parse_flags(flags)
    for name in mask:
        features[name] = False
    return CpuFeatures(
        model=model,
        logical_cores=os.cpu_count() or 1,
        usable_cores=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1),
        physical_cores=physical,
        features=features,
        caches=caches,
        torch_capability=torch.backends.cpu.get_cpu_capability(),
        mkldnn=torch.backends.mkldnn.is_available(),
    )
