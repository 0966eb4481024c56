"""The packed ternary CPU kernel (csrc/ternary_kernel.cpp): its weight layout, its build, its dispatch.

Layout the kernel reads ("blocked codes"), uint8 [out_features, 64 * ceil(in_features / 256)]: per
output row one 64-byte block per 256 input columns; byte j of block b holds the codes u = t + 1 of
columns 256b + j, + 64, + 128, + 192 in bits 0-1, 2-3, 4-5, 6-7. Unpacking 64 columns is one shift
and one AND; padding columns hold code 1 (t = 0). The file format (packed.py) keeps its own
row-major layout: this one is built from the integers at load.

Build: the source is compiled once per source, torch and compiler version with the system C++
compiler (`$CXX`, else `c++`/`g++`) against torch's headers, into
`$RYZEN_CACHE_DIR/extensions/` (default `~/.cache/ryzen/extensions/`), and loaded with
`torch.ops.load_library`: no ninja, no Python headers. It is compiled for plain x86-64; the AVX2
and AVX-512 VNNI kernels carry function target attributes and the library picks one at run time
from the CPU it runs on, so a cached library is safe on another machine. A failed build (no
compiler, an error) makes the kernel unavailable with the reason; callers fall back to torch.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.cpp_extension import include_paths, library_paths

SOURCE = Path(__file__).with_name("csrc") / "ternary_kernel.cpp"
BLOCK_COLUMNS, BLOCK_BYTES = 256, 64
ISA_NAMES = {0: "cpp-scalar", 1: "cpp-avx2", 2: "cpp-vnni"}
ISA_BY_NAME = {name: isa for isa, name in ISA_NAMES.items()}
FLAGS = ["-O3", "-std=c++17", "-shared", "-fPIC", "-fopenmp", "-ffp-contract=off", "-w"]
BUILD_TIMEOUT_S = 600


class KernelUnavailable(RuntimeError):
    """The C++ kernel cannot be used here; the message says why."""


@dataclass(frozen=True)
class KernelStatus:
    available: bool
    name: str
    """`cpp-vnni`, `cpp-avx2`, `cpp-scalar`, or `unavailable`."""
    isa: int | None = None
    library: str | None = None
    reason: str | None = None


def block_codes(t: torch.Tensor) -> torch.Tensor:
    """int8 ternary [out, in] -> the kernel's blocked codes, uint8 [out, 64 * ceil(in / 256)]."""
    out_features, in_features = t.shape
    blocks = -(-in_features // BLOCK_COLUMNS)
    codes = torch.ones(out_features, blocks * BLOCK_COLUMNS, dtype=torch.uint8)
    codes[:, :in_features] = (t.to(torch.int8) + 1).to(torch.uint8)
    lanes = codes.view(out_features, blocks, 4, BLOCK_BYTES)  # column 256b + 64 lane + j
    packed = lanes[:, :, 0] | lanes[:, :, 1] << 2 | lanes[:, :, 2] << 4 | lanes[:, :, 3] << 6
    return packed.reshape(out_features, blocks * BLOCK_BYTES).contiguous()


def unblock_codes(codes: torch.Tensor, in_features: int) -> torch.Tensor:
    """The inverse of `block_codes`: int8 ternary [out, in_features]."""
    out_features = codes.shape[0]
    blocks = codes.view(out_features, -1, BLOCK_BYTES)
    lanes = torch.stack([(blocks >> (2 * lane)) & 3 for lane in range(4)], dim=2)
    return lanes.reshape(out_features, -1)[:, :in_features].to(torch.int8) - 1


def compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")


def cache_dir() -> Path:
    """Where compiled kernels are kept: under $RYZEN_CACHE_DIR like the core's caches."""
    return Path(os.environ.get("RYZEN_CACHE_DIR", Path.home() / ".cache" / "ryzen")) / "extensions"


def _compiler_version(cxx: str) -> str:
    try:
        return subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30).stdout.split("\n")[0]
    except (OSError, subprocess.SubprocessError) as exc:
        raise KernelUnavailable(f"the C++ compiler {cxx} does not run ({exc})") from None


def _build_command(cxx: str, output: Path) -> list[str]:
    abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"
    libraries = [flag for path in library_paths() for flag in (f"-L{path}", f"-Wl,-rpath,{path}")]
    return [cxx, *FLAGS, abi, *(f"-I{path}" for path in include_paths()), str(SOURCE), *libraries,
            "-lc10", "-ltorch_cpu", "-o", str(output)]


def library_path() -> Path:
    """The compiled library for this source, torch and compiler, built now if missing (atomic: a
    concurrent build by another process writes its own temporary file)."""
    cxx = compiler()
    if cxx is None:
        raise KernelUnavailable("no C++ compiler (set CXX, or install g++)")
    key_text = "\n".join([SOURCE.read_text(), torch.__version__, _compiler_version(cxx), " ".join(FLAGS), sys.platform])
    target = cache_dir() / f"ryzen_bitnet_{hashlib.sha256(key_text.encode()).hexdigest()[:16]}.so"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f"{target.name}.{os.getpid()}.tmp")
    try:
        done = subprocess.run(_build_command(cxx, partial), capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
    except (OSError, subprocess.SubprocessError) as exc:
        raise KernelUnavailable(f"compiling {SOURCE.name} failed ({exc})") from None
    if done.returncode != 0:
        first_error = next((line for line in done.stderr.splitlines() if "error" in line), done.stderr.strip()[:300])
        partial.unlink(missing_ok=True)
        raise KernelUnavailable(f"compiling {SOURCE.name} failed: {first_error}")
    os.replace(partial, target)
    return target


_status: KernelStatus | None = None


def load() -> KernelStatus:
    """Build (first use) and load the library once per process; never raises."""
    global _status
    if _status is None:
        try:
            path = library_path()
            if not hasattr(torch.ops.ryzen_bitnet, "best_isa"):
                torch.ops.load_library(str(path))
            isa = int(torch.ops.ryzen_bitnet.best_isa())
            _status = KernelStatus(True, ISA_NAMES[isa], isa, str(path))
        except (KernelUnavailable, OSError, RuntimeError) as exc:
            _status = KernelStatus(False, "unavailable", reason=str(exc).splitlines()[0])
    return _status


def usable_isas() -> list[int]:
    """The kernels this CPU can run, fastest last (the scalar one always)."""
    status = load()
    return list(range(status.isa + 1)) if status.available else []


def int8_product(q: torch.Tensor, codes: torch.Tensor, isa: int) -> torch.Tensor:
    """int8 activations [M, K] x the blocked codes -> sum(t * q), int32 [M, out]."""
    return torch.ops.ryzen_bitnet.int8_product(q, codes, isa)


def integer_forward(x: torch.Tensor, codes: torch.Tensor, input_norm: bool, isa: int):
    """float [M, K] -> (sum(t * q) int32 [M, out], step float [M, 1]), quantizing x as quant.py does."""
    return torch.ops.ryzen_bitnet.integer_forward(x, codes, input_norm, isa)


def linear(x: torch.Tensor, codes: torch.Tensor, scale: float, bias: torch.Tensor | None, input_norm: bool,
           isa: int) -> torch.Tensor:
    """The whole ternary layer on float [M, K]: sum(t * q) * step * scale (+ bias), float [M, out]."""
    return torch.ops.ryzen_bitnet.linear(x, codes, scale, bias, input_norm, isa)
