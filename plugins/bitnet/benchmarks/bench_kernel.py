"""The packed ternary kernel against torch fp32 and torch int8 dynamic quantization, per layer and on a
12-layer stack, batch 1 (decode) and a small batch.

Implementations of a Linear [out, in], all on the same input, timed interleaved (fp32, int8 dynamic,
ternary torch-int8, ternary C++, then again), each measurement the mean of enough calls for ~10 ms:

- `fp32`: `nn.Linear` (torch's fp32 GEMV/GEMM, oneDNN/MKL);
- `int8-dyn`: `torch.ao.quantization.quantize_dynamic` of that Linear (int8 weights, activations
  quantized per call, fbgemm/oneDNN);
- `ternary-torch`: this plugin's TernaryLinear on its torch int8 path (`_int_mm` on an int8 copy), the
  fallback and what the plugin ran before the C++ kernel;
- `ternary-cpp`: TernaryLinear on the C++ kernel (2-bit codes), the plugin's default.

Both ternary layers include their whole work per call: RMSNorm factor, int8 quantization of the input,
product, rescale. The ratios are paired (measurement i of A next to measurement i of B) with a 95%
bootstrap interval (ryzen_core.compare_pairs); > 1 means ternary-cpp is faster. Weight GB/s: bytes of
the ternary codes per call over its time, beside the machine's measured read bandwidth for a buffer
of that size (ryzen_core.read_bandwidth_gbs; a small one measures the caches, not DRAM).

The stack is 12 layers of a ~100M-class model (d_model 768, d_ff 3072): per layer qkv 768->2304,
proj 768->768, up 768->3072, down 3072->768 (85M weights: 340 MB fp32, 85 MB int8, 21 MB ternary).

Decode (`--decode`): the built-in Transformer of that size (12 heads, vocab 2048, untrained: speed
does not depend on the weights), greedy generation of 32 tokens after 8 with ryzen_core.generate,
fp32 against the plugin's ternary model (ternary_model) on each kernel, tokens/s paired the same way.

`--clock cpu` (with `--threads 1` only) times the calling thread's CPU time instead of wall time: on a
machine shared with other jobs it leaves out the time the benchmark waited for a core (not the caches
the other jobs evict). With several threads only wall time means anything, and then a busy machine
stalls every parallel region on a descheduled thread.

Usage:

    .venv/bin/python plugins/bitnet/benchmarks/bench_kernel.py [--threads 2] [--batches 1 8] [--rounds 12]
        [--clock wall|cpu] [--no-stack] [--decode] [--kernel cpp|cpp-vnni|cpp-avx2|cpp-scalar]
"""
from __future__ import annotations

import argparse
import time
from typing import Callable

import torch
import torch.nn as nn

from ryzen_core import (Transformer, TransformerConfig, compare_pairs, cpu_description, format_ratio, generate,
                        load_snapshot, markdown_table, read_bandwidth_gbs)
from ryzen_plugin_bitnet import cpp_kernel
from ryzen_plugin_bitnet.kernel import TernaryLinear, ternary_model
from ryzen_plugin_bitnet.quant import ternary_weights

D_MODEL, D_FF, LAYERS = 768, 3072, 12
SHAPES = {"768x768": (D_MODEL, D_MODEL), "768->3072": (D_MODEL, D_FF), "3072->768": (D_FF, D_MODEL)}
IMPLEMENTATIONS = ("fp32", "int8-dyn", "ternary-torch", "ternary-cpp")
TARGET_SECONDS = 0.01


CPP_KERNEL = "cpp"  # --kernel: which C++ kernel `ternary-cpp` is


def implementations(linear: nn.Linear) -> dict[str, nn.Module]:
    from torch.ao.quantization import quantize_dynamic

    t, scale = ternary_weights(linear.weight)
    return {"fp32": linear,
            "int8-dyn": quantize_dynamic(nn.Sequential(linear), {nn.Linear}, dtype=torch.qint8)[0],
            "ternary-torch": TernaryLinear(t.to(torch.int8), scale, kernel="torch"),
            "ternary-cpp": TernaryLinear(t.to(torch.int8), scale, kernel=CPP_KERNEL)}


def layer_runner(in_features: int, out_features: int) -> tuple[dict[str, Callable], int]:
    """One Linear in each implementation, as callables of x; and the ternary codes' bytes."""
    built = implementations(nn.Linear(in_features, out_features, bias=False))
    return built, built["ternary-cpp"].codes.numel()


def stack_runner() -> tuple[dict[str, Callable], int]:
    """The 12-layer stack in each implementation; and the ternary codes' bytes."""
    per_layer = []
    for _ in range(LAYERS):
        shapes = [(D_MODEL, 3 * D_MODEL), (D_MODEL, D_MODEL), (D_MODEL, D_FF), (D_FF, D_MODEL)]
        per_layer.append([implementations(nn.Linear(i, o, bias=False)) for i, o in shapes])

    def run(name: str) -> Callable:
        def forward(x):
            for qkv, proj, up, down in per_layer:
                x = proj[name](qkv[name](x)[..., :D_MODEL])
                x = down[name](up[name](x))
            return x
        return forward

    codes = sum(layer["ternary-cpp"].codes.numel() for layers in per_layer for layer in layers)
    return {name: run(name) for name in IMPLEMENTATIONS}, codes


def timed(work: Callable[[], object], calls: int, clock: Callable[[], float]) -> float:
    start = clock()
    for _ in range(calls):
        work()
    return (clock() - start) / calls


def measure(runners: dict[str, Callable], x: torch.Tensor, rounds: int, clock: Callable[[], float]
            ) -> dict[str, list[float]]:
    """Seconds per call of each implementation, `rounds` interleaved rounds after a calibration."""
    calls = {name: max(1, int(TARGET_SECONDS / timed(lambda: run(x), 3, time.perf_counter)))
             for name, run in runners.items()}
    seconds: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(rounds):
        for name, run in runners.items():
            seconds[name].append(timed(lambda: run(x), calls[name], clock))
    return seconds


def row(label: str, batch: int, seconds: dict[str, list[float]], code_bytes: int) -> list[str]:
    median = {name: sorted(values)[len(values) // 2] for name, values in seconds.items()}
    vs = {name: compare_pairs(seconds[name], seconds["ternary-cpp"], higher_is_better=False)
          for name in ("fp32", "int8-dyn", "ternary-torch")}
    gbs = code_bytes / median["ternary-cpp"] / 1e9
    return [label, str(batch), *(f"{median[name] * 1e6:,.0f}" for name in IMPLEMENTATIONS),
            *(format_ratio(vs[name]) for name in vs), f"{gbs:.1f}", f"{read_bandwidth_gbs(code_bytes):.1f}"]


def decode_rows(batches: list[int], rounds: int, clock: Callable[[], float]) -> list[list[str]]:
    model = Transformer(TransformerConfig(vocab_size=2048, d_model=D_MODEL, n_heads=12, n_layers=LAYERS, d_ff=D_FF,
                                          context_length=256)).eval()
    models = {"fp32": model, "ternary-torch": ternary_model(model, kernel="torch"),
              "ternary-cpp": ternary_model(model, kernel=CPP_KERNEL)}
    rows = []
    for batch in batches:
        prompt = torch.randint(0, 2048, (batch, 8), generator=torch.Generator().manual_seed(0))
        seconds: dict[str, list[float]] = {name: [] for name in models}
        for name, m in models.items():
            generate(m, prompt, 2)  # warm-up
        for _ in range(rounds):
            for name, m in models.items():
                seconds[name].append(timed(lambda: generate(m, prompt, 32), 1, clock))
        tok_s = {name: 32 * batch / sorted(values)[len(values) // 2] for name, values in seconds.items()}
        rows.append([str(batch), *(f"{tok_s[name]:,.1f}" for name in models),
                     format_ratio(compare_pairs(seconds["fp32"], seconds["ternary-cpp"], higher_is_better=False)),
                     format_ratio(compare_pairs(seconds["ternary-torch"], seconds["ternary-cpp"],
                                                higher_is_better=False))])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--rounds", type=int, default=12, help="interleaved rounds per comparison")
    parser.add_argument("--no-stack", action="store_true", help="only the single layers")
    parser.add_argument("--decode", action="store_true", help="also generate with a 12-layer model")
    parser.add_argument("--kernel", choices=["cpp", "cpp-vnni", "cpp-avx2", "cpp-scalar"], default="cpp",
                        help="the C++ kernel to time (cpp: the best this CPU runs)")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="cpu: the thread's CPU time (only with --threads 1)")
    args = parser.parse_args()
    if args.clock == "cpu" and args.threads != 1:
        parser.error("--clock cpu measures one thread: use it with --threads 1")
    clock = time.thread_time if args.clock == "cpu" else time.perf_counter
    torch.set_num_threads(args.threads)
    global CPP_KERNEL
    status, CPP_KERNEL = cpp_kernel.load(), args.kernel
    if not status.available:
        raise SystemExit(f"the C++ kernel is unavailable: {status.reason}")
    torch.manual_seed(0)
    cases = [(label, *layer_runner(*shape)) for label, shape in SHAPES.items()]
    if not args.no_stack:
        cases.append((f"{LAYERS}-layer stack", *stack_runner()))
    rows, load_before = [], load_snapshot()
    with torch.inference_mode():
        for label, runners, code_bytes in cases:
            for batch in args.batches:
                x = torch.randn(batch, D_FF if label.startswith("3072") else D_MODEL)
                rows.append(row(label, batch, measure(runners, x, args.rounds, clock), code_bytes))
    cpu = cpu_description()
    print(f"machine: {cpu['model']}, {cpu['usable_cores']} usable cores, flags {', '.join(cpu['flags'])}; "
          f"torch {torch.__version__}, {args.threads} threads, {args.clock} clock; "
          f"ternary-cpp: {args.kernel if args.kernel != 'cpp' else status.name}; "
          f"load average {load_before['load_1m']} before, {load_snapshot()['load_1m']} after\n")
    headers = ["shape (in->out)", "batch", *(f"{name} us" for name in IMPLEMENTATIONS),
               "cpp vs fp32 [95%]", "cpp vs int8-dyn [95%]", "cpp vs ternary-torch [95%]",
               "cpp weight GB/s", "measured read GB/s (same bytes)"]
    print(markdown_table(headers, rows))
    if args.decode:
        with torch.inference_mode():
            decoded = decode_rows(args.batches, args.rounds, clock)
        print("\nDecode, 12-layer d_model 768 model, 32 new tokens (tokens/s, median):\n")
        print(markdown_table(["batch", "fp32 tok/s", "ternary-torch tok/s", "ternary-cpp tok/s",
                              "cpp vs fp32 [95%]", "cpp vs ternary-torch [95%]"], decoded))


if __name__ == "__main__":
    main()
