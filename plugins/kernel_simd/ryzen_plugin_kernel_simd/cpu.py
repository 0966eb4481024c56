"""CPU feature detection: the OS's view (py-cpuinfo, /proc/cpuinfo) cross-checked with torch's."""
from __future__ import annotations

import functools
import os
from dataclasses import asdict, dataclass, field
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
    features: dict[str, bool] = field(default_factory=dict)
    torch_capability: str = ""
    mkldnn: bool = False

    @property
    def native_bf16(self) -> bool:
        return self.features.get("avx512_bf16", False) or self.features.get("amx_bf16", False)

    def as_dict(self) -> dict:
        return dict(asdict(self), native_bf16=self.native_bf16)


def parse_flags(flags: Iterable[str]) -> dict[str, bool]:
    present = {f.lower() for f in flags}
    return {name: any(a in present for a in aliases) for name, aliases in FEATURES.items()}


def flags_from_proc_cpuinfo(text: str) -> list[str]:
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return value.split()
    return []


@functools.lru_cache(maxsize=1)
def _live_cpu() -> tuple[list[str], str]:
    # py-cpuinfo takes about a second (it starts a subprocess); the CPU does not change within a process.
    import cpuinfo

    info = cpuinfo.get_cpu_info()
    return list(info.get("flags", [])), info.get("brand_raw", "unknown")


def detect(proc_cpuinfo: str | None = None, mask: Iterable[str] = ()) -> CpuFeatures:
    """Detect this CPU (or parse a captured /proc/cpuinfo); `mask` hides features, to test fallbacks."""
    if proc_cpuinfo is None:
        flags, model = _live_cpu()
    else:
        flags = flags_from_proc_cpuinfo(proc_cpuinfo)
        model = next((l.split(":", 1)[1].strip() for l in proc_cpuinfo.splitlines() if l.startswith("model name")),
                     "unknown")
    features = parse_flags(flags)
    for name in mask:
        features[name] = False
    return CpuFeatures(
        model=model,
        logical_cores=os.cpu_count() or 1,
        usable_cores=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1),
        features=features,
        torch_capability=torch.backends.cpu.get_cpu_capability(),
        mkldnn=torch.backends.mkldnn.is_available(),
    )
