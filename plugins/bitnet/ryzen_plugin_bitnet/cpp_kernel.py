"""The packed ternary CPU kernel (csrc/ternary_kernel.cpp): its weight layout, its build, its dispatch.

Layout the kernel reads ("blocked codes"), uint8 [ceil(out / 16), 64 * ceil(in / 16)]: output rows in
groups of 16 (one row of the tensor per group), input columns in chunks of 16, one 64-byte block per
chunk. Byte 4r + i of a block holds the codes u = t + 1 of the group's row r at the chunk's columns
4l + i, l = 0..3, in bits 2l and 2l + 1. One AND (and one shift) unpacks a block into, per 32-bit lane
(one row), the four codes that AVX-512 VNNI's dpbusd multiplies by four activations broadcast to all
lanes: sixteen rows' sums accumulate in one register with no horizontal reduction at the end (the
kernel's first layout, a row's 256 columns per block, spent about as long reducing as multiplying
at d_model 768). Padding rows and columns hold code 1 (t = 0). The file format (packed.py) keeps its
own row-major layout: this one is built from the integers at load.

Build: the source is compiled once per source, torch and compiler version with the system C++
compiler (`$CXX`, else `c++`/`g++`) against torch's headers, into
`$RYZEN_CACHE_DIR/extensions/` (default `~/.cache/ryzen/extensions/`), and loaded with
`torch.ops.load_library`: no ninja, no Python headers. It is compiled for plain x86-64; the AVX2
and AVX-512 VNNI kernels carry function target attributes and the library picks one at run time
from the CPU it runs on, so a cached library is safe on another machine. A failed build (no
compiler, an error) makes the kernel unavailable with the reason; callers fall back to torch.
"""
from __future__ import annotations

import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.cpp_extension import include_paths, library_paths

from ryzen_core import default_cache_dir

SOURCE = Path(__file__).with_name("csrc") / "ternary_kernel.cpp"
GROUP_ROWS, CHUNK_COLUMNS = 16, 16
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
    """int8 ternary [out, in] -> the kernel's blocked codes, uint8 [ceil(out / 16), 64 * ceil(in / 16)]."""
    out_features, in_features = t.shape
    groups, chunks = -(-out_features // GROUP_ROWS), -(-in_features // CHUNK_COLUMNS)
    codes = torch.ones(groups * GROUP_ROWS, chunks * CHUNK_COLUMNS, dtype=torch.uint8)
    codes[:out_features, :in_features] = (t.to(torch.int8) + 1).to(torch.uint8)
    # [group, row, chunk, l, i] (column 16 chunk + 4 l + i) -> [group, chunk, row, i, l]
    lanes = codes.view(groups, GROUP_ROWS, chunks, 4, 4).permute(0, 2, 1, 4, 3)
    packed = lanes[..., 0] | lanes[..., 1] << 2 | lanes[..., 2] << 4 | lanes[..., 3] << 6
    return packed.reshape(groups, chunks * 64).contiguous()


def unblock_codes(codes: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
    """The inverse of `block_codes`: int8 ternary [out_features, in_features]."""
    groups = codes.shape[0]
    blocks = codes.view(groups, -1, GROUP_ROWS, 4)  # [group, chunk, row, i]
    lanes = torch.stack([(blocks >> (2 * l)) & 3 for l in range(4)], dim=-1).permute(0, 2, 1, 4, 3)
    return lanes.reshape(groups * GROUP_ROWS, -1)[:out_features, :in_features].to(torch.int8) - 1


def compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")


def cache_dir() -> Path:
    """Where compiled kernels are kept: under $RYZEN_CACHE_DIR like the core's caches."""
    return default_cache_dir() / "extensions"


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
    if platform.machine().lower() not in ("x86_64", "amd64"):
        raise KernelUnavailable(f"the C++ kernel is written for x86-64; this machine is {platform.machine()}")
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


@functools.cache
def load() -> KernelStatus:
    """Build (first use) and load the library; once per process (a library loads into the process,
    so the answer is the process's), never raises."""
    try:
        path = library_path()
        if not hasattr(torch.ops.ryzen_bitnet, "best_isa"):
            torch.ops.load_library(str(path))
        isa = int(torch.ops.ryzen_bitnet.best_isa())
        return KernelStatus(True, ISA_NAMES[isa], isa, str(path))
    except (KernelUnavailable, OSError, RuntimeError) as exc:
        return KernelStatus(False, "unavailable", reason=str(exc).splitlines()[0])


def usable_isas() -> list[int]:
    """The kernels this CPU can run, fastest last (the scalar one always)."""
    status = load()
    return list(range(status.isa + 1)) if status.available else []


def int8_product(q: torch.Tensor, codes: torch.Tensor, out_features: int, isa: int) -> torch.Tensor:
    """int8 activations [M, K] x the blocked codes -> sum(t * q), int32 [M, out_features]."""
    return torch.ops.ryzen_bitnet.int8_product(q, codes, out_features, isa)


def integer_forward(x: torch.Tensor, codes: torch.Tensor, out_features: int, input_norm: bool, isa: int):
    """float [M, K] -> (sum(t * q) int32 [M, out], step float [M, 1]), quantizing x as quant.py does."""
    return torch.ops.ryzen_bitnet.integer_forward(x, codes, out_features, input_norm, isa)


def linear(x: torch.Tensor, codes: torch.Tensor, out_features: int, scale: float, bias: torch.Tensor | None,
           input_norm: bool, isa: int) -> torch.Tensor:
    """The whole ternary layer on float [M, K]: sum(t * q) * step * scale (+ bias), float [M, out]."""
    return torch.ops.ryzen_bitnet.linear(x, codes, out_features, scale, bias, input_norm, isa)
