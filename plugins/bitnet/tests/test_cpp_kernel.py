"""The C++ ternary kernel: its blocked layout, int32 accumulators bit-exact against the fake-quant
reference for every kernel this CPU runs (odd sizes, batch 1 and several), and the fallback to torch's
int8 path, recorded with its reason, when the library cannot be built."""
import platform

import pytest
import torch

from ryzen_core import PluginError, RunContext, Transformer, TransformerConfig
from ryzen_plugin_bitnet import cpp_kernel
from ryzen_plugin_bitnet.kernel import CPP_KERNELS, TernaryLinear, kernel_description
from ryzen_plugin_bitnet.plugin import BitNetPlugin, BitNetSettings
from ryzen_plugin_bitnet.quant import BitLinear, quantized_input, ternary_weights

needs_compiler = pytest.mark.skipif(
    cpp_kernel.compiler() is None or platform.machine().lower() not in ("x86_64", "amd64"),
    reason=f"no C++ compiler (set CXX or install g++), or not x86-64 ({platform.machine()})")

# (tokens, in_features, out_features): K and N not multiples of 256, 64 or 16 (but one), one token, a few,
# a token tile and a half (8 + 5), two tiles, and more (a prefill)
SHAPES = [(1, 7, 5), (1, 300, 17), (3, 33, 130), (13, 513, 129), (16, 768, 64), (2, 1100, 3), (41, 70, 33)]


@pytest.fixture(scope="module")
def usable():
    """The C++ kernels this CPU runs. With a compiler present a failed build is a failure, not a skip."""
    status = cpp_kernel.load()
    assert status.available, f"the C++ kernel did not build: {status.reason}"
    return [cpp_kernel.ISA_NAMES[isa] for isa in cpp_kernel.usable_isas()]


def kernel_or_skip(usable, name):
    if name not in usable:
        pytest.skip(f"this CPU cannot run {name} (it runs {usable})")
    return cpp_kernel.ISA_BY_NAME[name]


def random_ternary(out_features, in_features, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(-1, 2, (out_features, in_features), generator=gen).to(torch.int8)


def test_the_blocked_layout_is_the_documented_one():
    t = random_ternary(20, 35, seed=0)
    codes = cpp_kernel.block_codes(t)
    assert codes.dtype == torch.uint8 and codes.shape == (2, 3 * 64)  # 20 rows: 2 groups; 35 columns: 3 chunks
    u = (t.to(torch.int32) + 1).tolist()
    for group, chunk, row, i in [(0, 0, 0, 0), (0, 1, 5, 3), (1, 0, 3, 2), (1, 1, 2, 1)]:
        # byte 4 row + i of the block: the row's columns 16 chunk + 4 l + i in bits 2l, 2l + 1
        n, columns = 16 * group + row, [16 * chunk + 4 * l + i for l in range(4)]
        expected = sum(u[n][column] << (2 * l) for l, column in enumerate(columns))
        assert codes[group, 64 * chunk + 4 * row + i].item() == expected
    assert codes[1, 4 * 4].item() == 0b01010101  # group 1, row 4 = row 20: padding, code 1 (zero)
    assert codes[0, 64 * 2 + 4 * 0 + 3].item() == 0b01010101  # chunk 2, columns 35, 39, 43, 47: padding
    assert torch.equal(cpp_kernel.unblock_codes(codes, 20, 35), t)


@needs_compiler
@pytest.mark.parametrize("name", CPP_KERNELS)
@pytest.mark.parametrize("tokens,in_features,out_features", SHAPES)
def test_int8_products_are_exact(usable, name, tokens, in_features, out_features):
    isa = kernel_or_skip(usable, name)
    t = random_ternary(out_features, in_features, seed=in_features)
    q = torch.randint(-128, 128, (tokens, in_features), generator=torch.Generator().manual_seed(1), dtype=torch.int8)
    q[0, 0] = -128  # the one value whose magnitude is 128
    acc = cpp_kernel.int8_product(q, cpp_kernel.block_codes(t), out_features, isa)
    assert acc.dtype == torch.int32 and torch.equal(acc.long(), q.long() @ t.long().T)


@needs_compiler
@pytest.mark.parametrize("name", CPP_KERNELS)
@pytest.mark.parametrize("tokens,in_features,out_features", SHAPES)
def test_a_layer_gives_the_fake_quant_references_integers_and_output(usable, name, tokens, in_features, out_features):
    kernel_or_skip(usable, name)
    torch.manual_seed(in_features)
    reference = BitLinear.from_linear(torch.nn.Linear(in_features, out_features, bias=True))
    t, scale = ternary_weights(reference.weight)
    layer = TernaryLinear(t.to(torch.int8), scale, reference.bias.detach(), kernel=name)
    assert layer.kernel == name and not hasattr(layer, "ternary")  # decode reads the 2-bit codes only
    x = torch.randn(tokens, in_features) * 3

    acc, step = layer.integer_forward(x)
    q, ref_step = quantized_input(x, True)
    assert acc.dtype == torch.int32 and torch.equal(acc.double(), q.double() @ t.double().T)
    # the step's RMSNorm factor sums its mean in another order: last bit only
    torch.testing.assert_close(step, ref_step, rtol=3e-7, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), reference(x), rtol=1e-5, atol=1e-5)


@needs_compiler
@pytest.mark.parametrize("name", CPP_KERNELS)
def test_rounding_ties_and_the_largest_sums_are_quant_pys(usable, name):
    isa = kernel_or_skip(usable, name)
    # absmax 127 makes step exactly 1: x / step has ties, which round half to even like torch.round
    x = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.49, -126.5] + [0.0] * 24])
    identity = torch.eye(x.shape[1], dtype=torch.int8)
    acc, _ = cpp_kernel.integer_forward(x, cpp_kernel.block_codes(identity), x.shape[1], False, isa)
    assert torch.equal(acc, quantized_input(x, False)[0].to(torch.int32))
    # every product at its extreme over a long row: 10240 * 128 and its negative, still exact in int32
    q = torch.full((2, 10240), -128, dtype=torch.int8)
    t = torch.stack([torch.ones(10240), -torch.ones(10240)]).to(torch.int8)
    assert cpp_kernel.int8_product(q, cpp_kernel.block_codes(t), 2, isa).tolist() == [[-1310720, 1310720]] * 2


@needs_compiler
def test_threads_split_rows_without_changing_a_bit(usable):
    t = random_ternary(2000, 512, seed=3)  # 125 groups of rows: more than one thread's share
    codes, isa = cpp_kernel.block_codes(t), cpp_kernel.usable_isas()[-1]
    threads = torch.get_num_threads()
    for tokens in (1, 5):
        x = torch.randn(tokens, 512)
        try:
            torch.set_num_threads(1)
            one = cpp_kernel.integer_forward(x, codes, 2000, True, isa)
            torch.set_num_threads(2)
            two = cpp_kernel.integer_forward(x, codes, 2000, True, isa)
        finally:
            torch.set_num_threads(threads)
        assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])
        assert torch.equal(one[0].double(), quantized_input(x, True)[0].double() @ t.double().T)


@needs_compiler
def test_the_description_names_the_kernel(usable):
    t, scale = ternary_weights(torch.randn(40, 70))
    layer = TernaryLinear(t.to(torch.int8), scale)
    assert layer.kernel == usable[-1] and layer.fallback_reason is None
    assert kernel_description(torch.nn.Sequential(layer, TernaryLinear(t.to(torch.int8), scale))) == usable[-1]


@pytest.fixture
def fresh_load():
    """load() asked again in this test, and again after it (it answers once per process)."""
    cpp_kernel.load.cache_clear()
    yield
    cpp_kernel.load.cache_clear()


@pytest.fixture
def no_compiler(monkeypatch, tmp_path, fresh_load):
    """The process as it is on a machine without a C++ compiler (and without a cached library)."""
    monkeypatch.setenv("RYZEN_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(cpp_kernel, "compiler", lambda: None)


def test_without_a_compiler_layers_fall_back_to_torch_and_say_why(no_compiler):
    t, scale = ternary_weights(torch.randn(8, 20))
    layer = TernaryLinear(t.to(torch.int8), scale)
    assert layer.kernel == "int_mm" and "no C++ compiler" in layer.fallback_reason
    assert kernel_description(torch.nn.Sequential(layer)).startswith("torch-int8 fallback (the C++ ternary kernel")
    x = torch.randn(2, 20)
    assert torch.equal(layer.integer_forward(x)[0].double(), quantized_input(x, True)[0].double() @ t.double().T)
    with pytest.raises(cpp_kernel.KernelUnavailable, match="no C\\+\\+ compiler"):
        TernaryLinear(t.to(torch.int8), scale, kernel="cpp")


def test_a_failing_compiler_is_a_recorded_reason_not_a_crash(monkeypatch, tmp_path, fresh_load):
    monkeypatch.setenv("RYZEN_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(cpp_kernel, "compiler", lambda: "false")  # runs, prints nothing, exits 1
    status = cpp_kernel.load()
    assert not status.available and "compiling ternary_kernel.cpp failed" in status.reason
    assert not list(tmp_path.rglob("*.so*"))  # no partial library left in the cache


def test_a_cpu_other_than_x86_64_is_a_recorded_reason(monkeypatch, tmp_path, fresh_load):
    monkeypatch.setenv("RYZEN_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(cpp_kernel.platform, "machine", lambda: "aarch64")
    status = cpp_kernel.load()
    assert not status.available and "this machine is aarch64" in status.reason


def small_model():
    torch.manual_seed(0)
    return Transformer(TransformerConfig(vocab_size=64, d_model=16, n_heads=2, n_layers=1, d_ff=32, context_length=16))


def test_the_plugin_records_the_fallback_and_refuses_a_forced_cpp_kernel(no_compiler, tmp_path, tiny_config):
    def infer(kernel):
        plugin = BitNetPlugin(BitNetSettings(kernel=kernel), RunContext(tiny_config(), None, tmp_path, tmp_path,
                                                                        "optimized"))
        events = []
        return plugin.on_infer(small_model(), lambda event, **data: events.append(data), plugin.context), events

    path, events = infer("auto")
    assert events[0]["kernel"].startswith("torch-int8 fallback (") and "no C++ compiler" in events[0]["kernel"]
    assert path.kernel == events[0]["kernel"] and path(torch.randint(0, 64, (1, 4)), 2).shape == (1, 6)
    with pytest.raises(PluginError, match="bitnet.kernel=cpp"):
        infer("cpp")
