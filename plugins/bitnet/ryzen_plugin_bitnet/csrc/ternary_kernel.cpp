// Ternary weights (2-bit codes) times int8 activations on the CPU, for decode and small batches.
//
// Layout (see cpp_kernel.py): per output row, one 64-byte block per 256 input columns; byte j of a
// block holds the codes u = w + 1 of columns j, 64 + j, 128 + j, 192 + j in bits 0-1, 2-3, 4-5, 6-7,
// so one shift and one AND give 64 consecutive columns' codes. Padding columns have code 1 (w = 0)
// and zero activations. Each token is quantized to int8 exactly as quant.py does (absmax, round half
// to even), then sum(u * q) - sum(q) = sum(w * q) exactly in int32.
//
// One source for every x86-64 CPU: only the kernels carry target attributes, and which one runs is
// chosen at run time (best_isa), so the compiled library may be shared between machines.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace {

constexpr int64_t kBlockColumns = 256;
constexpr int64_t kBlockBytes = 64;
constexpr int64_t kTokenTile = 8;  // tokens sharing one unpacking of the codes
constexpr int64_t kRowTile = 32;   // rows whose codes stay in L1 while every token tile passes over them
constexpr float kEps = 1e-5f;      // quant.py's EPS
constexpr float kRoundMagic = 12582912.0f;  // 1.5 * 2^23: (v + m) - m rounds |v| < 2^22 half to even

enum Isa : int64_t { kScalar = 0, kAvx2 = 1, kVnni = 2 };

int64_t best_isa() {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vnni"))
    return kVnni;
  return __builtin_cpu_supports("avx2") ? kAvx2 : kScalar;
}

// Activations of M tokens as the kernels read them: int8, each row padded with zeros to the blocks.
struct Tokens {
  std::vector<int8_t> q;
  std::vector<int32_t> sums;  // sum(q) per token: what the codes' +1 adds
  std::vector<float> steps;   // quant.py's step (times the RMSNorm factor when asked)
  int64_t rows = 0, padded = 0;
};

// quant.py's int8_activations and quantized_input, one token at a time: the absmax (with the sum of
// squares for the norm), then q = clamp(round_half_even(x / step), -128, 127) with step = max(amax,
// EPS) / 127. These are torch's float operations in torch's order, so the integers are identical;
// only the norm's mean is summed in another order (in double), so the step may differ in its last bit.
// The vector versions do whole vectors and return where the scalar code takes over.
struct Scan {
  float amax = 0.0f;
  double squares = 0.0;
};

void scan_scalar(const float* x, int64_t begin, int64_t k, Scan& s) {
  for (int64_t i = begin; i < k; ++i) {
    s.amax = std::max(s.amax, std::fabs(x[i]));
    s.squares += static_cast<double>(x[i]) * x[i];
  }
}

int32_t to_int8_scalar(const float* x, int64_t begin, int64_t k, float step, int8_t* q) {
  int32_t total = 0;
  for (int64_t i = begin; i < k; ++i) {
    const float v = (x[i] / step + kRoundMagic) - kRoundMagic;  // |x / step| <= 127 (+ rounding)
    q[i] = static_cast<int8_t>(std::min(std::max(v, -128.0f), 127.0f));
    total += q[i];
  }
  return total;
}

__attribute__((target("avx512f"))) int64_t scan_avx512(const float* x, int64_t k, Scan& s) {
  __m512 amax = _mm512_setzero_ps();
  __m512d squares = _mm512_setzero_pd();
  int64_t i = 0;
  for (; i + 16 <= k; i += 16) {
    const __m512 v = _mm512_loadu_ps(x + i);
    amax = _mm512_max_ps(amax, _mm512_abs_ps(v));
    const __m512d lo = _mm512_cvtps_pd(_mm512_castps512_ps256(v));
    const __m512d hi = _mm512_cvtps_pd(_mm256_castsi256_ps(_mm512_extracti64x4_epi64(_mm512_castps_si512(v), 1)));
    squares = _mm512_fmadd_pd(hi, hi, _mm512_fmadd_pd(lo, lo, squares));
  }
  s.amax = _mm512_reduce_max_ps(amax), s.squares = _mm512_reduce_add_pd(squares);
  return i;
}

__attribute__((target("avx512f"))) int64_t to_int8_avx512(const float* x, int64_t k, float step, int8_t* q,
                                                          int32_t& total) {
  const __m512 s = _mm512_set1_ps(step), lo = _mm512_set1_ps(-128.0f), hi = _mm512_set1_ps(127.0f);
  __m512i sums = _mm512_setzero_si512();
  int64_t i = 0;
  for (; i + 16 <= k; i += 16) {
    const __m512 v = _mm512_roundscale_ps(_mm512_div_ps(_mm512_loadu_ps(x + i), s),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512i w = _mm512_cvtps_epi32(_mm512_min_ps(_mm512_max_ps(v, lo), hi));
    sums = _mm512_add_epi32(sums, w);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + i), _mm512_cvtepi32_epi8(w));
  }
  total = _mm512_reduce_add_epi32(sums);
  return i;
}

__attribute__((target("avx2,fma"))) int64_t scan_avx2(const float* x, int64_t k, Scan& s) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  __m256 amax = _mm256_setzero_ps();
  __m256d squares = _mm256_setzero_pd();
  int64_t i = 0;
  for (; i + 8 <= k; i += 8) {
    const __m256 v = _mm256_loadu_ps(x + i);
    amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v));
    const __m256d lo = _mm256_cvtps_pd(_mm256_castps256_ps128(v)), hi = _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1));
    squares = _mm256_fmadd_pd(hi, hi, _mm256_fmadd_pd(lo, lo, squares));
  }
  alignas(32) float lanes[8];
  alignas(32) double parts[4];
  _mm256_store_ps(lanes, amax), _mm256_store_pd(parts, squares);
  s.amax = *std::max_element(lanes, lanes + 8), s.squares = parts[0] + parts[1] + parts[2] + parts[3];
  return i;
}

__attribute__((target("avx2"))) int64_t to_int8_avx2(const float* x, int64_t k, float step, int8_t* q,
                                                    int32_t& total) {
  const __m256 s = _mm256_set1_ps(step), lo = _mm256_set1_ps(-128.0f), hi = _mm256_set1_ps(127.0f);
  __m256i sums = _mm256_setzero_si256();
  int64_t i = 0;
  for (; i + 8 <= k; i += 8) {
    const __m256 v = _mm256_round_ps(_mm256_div_ps(_mm256_loadu_ps(x + i), s),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m256i w = _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(v, lo), hi));
    sums = _mm256_add_epi32(sums, w);
    const __m128i w16 = _mm_packs_epi32(_mm256_castsi256_si128(w), _mm256_extracti128_si256(w, 1));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(q + i), _mm_packs_epi16(w16, w16));
  }
  alignas(32) int32_t lanes[8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), sums);
  total = lanes[0] + lanes[1] + lanes[2] + lanes[3] + lanes[4] + lanes[5] + lanes[6] + lanes[7];
  return i;
}

void quantize_token(const float* x, int64_t k, bool input_norm, int64_t isa, int8_t* q, int32_t& sum,
                    float& step) {
  Scan s;
  scan_scalar(x, isa == kVnni ? scan_avx512(x, k, s) : isa == kAvx2 ? scan_avx2(x, k, s) : 0, k, s);
  step = std::max(s.amax, kEps) / 127.0f;
  int32_t total = 0;
  const int64_t done = isa == kVnni ? to_int8_avx512(x, k, step, q, total)
                       : isa == kAvx2 ? to_int8_avx2(x, k, step, q, total) : 0;
  sum = total + to_int8_scalar(x, done, k, step, q);
  if (input_norm) step *= 1.0f / std::sqrt(static_cast<float>(s.squares / k) + kEps);
}

Tokens quantize(const at::Tensor& x, int64_t padded, bool input_norm, int64_t isa) {
  Tokens t;
  t.rows = x.size(0), t.padded = padded;
  t.q.assign(t.rows * padded, 0), t.sums.resize(t.rows), t.steps.resize(t.rows);
  const float* data = x.data_ptr<float>();
  for (int64_t m = 0; m < t.rows; ++m)
    quantize_token(data + m * x.size(1), x.size(1), input_norm, isa, &t.q[m * padded], t.sums[m], t.steps[m]);
  return t;
}

Tokens from_int8(const at::Tensor& q, int64_t padded) {
  Tokens t;
  t.rows = q.size(0), t.padded = padded;
  t.q.assign(t.rows * padded, 0), t.sums.assign(t.rows, 0), t.steps.assign(t.rows, 1.0f);
  const int8_t* data = q.data_ptr<int8_t>();
  for (int64_t m = 0; m < t.rows; ++m)
    for (int64_t i = 0; i < q.size(1); ++i) {
      t.q[m * padded + i] = data[m * q.size(1) + i];
      t.sums[m] += data[m * q.size(1) + i];
    }
  return t;
}

// What every kernel gets: rows [n0, n1) of the codes, T tokens from `q` (stride `padded`), and
// out[t * n_out + n] = sum(w * q) for each of them.
struct Job {
  const uint8_t* codes;
  int64_t blocks;
  const int8_t* q;
  const int32_t* sums;
  int64_t padded;
  int32_t* out;
  int64_t n_out;
};

template <int T>
void rows_scalar(const Job& job, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = job.codes + n * job.blocks * kBlockBytes;
    for (int t = 0; t < T; ++t) {
      const int8_t* a = job.q + t * job.padded;
      int32_t acc = 0;
      for (int64_t b = 0; b < job.blocks; ++b)
        for (int64_t j = 0; j < kBlockBytes; ++j) {
          const int32_t c = row[b * kBlockBytes + j];
          const int8_t* col = a + b * kBlockColumns + j;
          acc += (c & 3) * col[0] + (c >> 2 & 3) * col[64] + (c >> 4 & 3) * col[128] + (c >> 6 & 3) * col[192];
        }
      job.out[t * job.n_out + n] = acc - job.sums[t];
    }
  }
}

// AVX2: maddubs multiplies u8 codes by s8 activations and adds pairs into int16. |pair| <= 2 * 2 * 128
// = 512, and the four of a block add up to at most 2048: no int16 saturation.
template <int T>
__attribute__((target("avx2,fma"))) void rows_avx2(const Job& job, int64_t n0, int64_t n1) {
  const __m256i mask = _mm256_set1_epi8(3), ones = _mm256_set1_epi16(1);
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = job.codes + n * job.blocks * kBlockBytes;
    __m256i acc[T];
    for (int t = 0; t < T; ++t) acc[t] = _mm256_setzero_si256();
    for (int64_t b = 0; b < job.blocks; ++b)
      for (int64_t half = 0; half < 2; ++half) {
        const __m256i c = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + b * kBlockBytes + 32 * half));
        const __m256i u[4] = {_mm256_and_si256(c, mask), _mm256_and_si256(_mm256_srli_epi16(c, 2), mask),
                              _mm256_and_si256(_mm256_srli_epi16(c, 4), mask),
                              _mm256_and_si256(_mm256_srli_epi16(c, 6), mask)};
        for (int t = 0; t < T; ++t) {
          const int8_t* a = job.q + t * job.padded + b * kBlockColumns + 32 * half;
          __m256i pairs = _mm256_setzero_si256();
          for (int lane = 0; lane < 4; ++lane)
            pairs = _mm256_add_epi16(pairs, _mm256_maddubs_epi16(
                u[lane], _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + 64 * lane))));
          acc[t] = _mm256_add_epi32(acc[t], _mm256_madd_epi16(pairs, ones));
        }
      }
    for (int t = 0; t < T; ++t) {
      const __m128i s = _mm_add_epi32(_mm256_castsi256_si128(acc[t]), _mm256_extracti128_si256(acc[t], 1));
      const __m128i s2 = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
      job.out[t * job.n_out + n] = _mm_cvtsi128_si32(_mm_add_epi32(s2, _mm_shuffle_epi32(s2, 0xb1))) - job.sums[t];
    }
  }
}

// AVX-512 VNNI: dpbusd adds u8 x s8 products by fours into int32 lanes. A single token gets four
// accumulators (one per bit pair), several tokens two each, so that enough independent dpbusd
// chains are in flight to hide their latency.
template <int T>
__attribute__((target("avx512f,avx512bw,avx512vnni"))) void rows_vnni(const Job& job, int64_t n0, int64_t n1) {
  constexpr int L = T == 1 ? 4 : 2;
  const __m512i mask = _mm512_set1_epi8(3);
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = job.codes + n * job.blocks * kBlockBytes;
    __m512i acc[T][L];
    for (int t = 0; t < T; ++t)
      for (int l = 0; l < L; ++l) acc[t][l] = _mm512_setzero_si512();
    for (int64_t b = 0; b < job.blocks; ++b) {
      const __m512i c = _mm512_loadu_si512(row + b * kBlockBytes);
      const __m512i u[4] = {_mm512_and_si512(c, mask), _mm512_and_si512(_mm512_srli_epi16(c, 2), mask),
                            _mm512_and_si512(_mm512_srli_epi16(c, 4), mask),
                            _mm512_and_si512(_mm512_srli_epi16(c, 6), mask)};
      for (int t = 0; t < T; ++t) {
        const int8_t* a = job.q + t * job.padded + b * kBlockColumns;
        for (int lane = 0; lane < 4; ++lane)
          acc[t][lane % L] = _mm512_dpbusd_epi32(acc[t][lane % L], u[lane], _mm512_loadu_si512(a + 64 * lane));
      }
    }
    for (int t = 0; t < T; ++t) {
      __m512i total = acc[t][0];
      for (int l = 1; l < L; ++l) total = _mm512_add_epi32(total, acc[t][l]);
      job.out[t * job.n_out + n] = _mm512_reduce_add_epi32(total) - job.sums[t];
    }
  }
}

// AVX-512 VNNI, one token (decode): two rows at a time share the activation loads, and the codes are
// not shifted down: `c & (3 << 2l)` is 4^l * u, at most 128, still a valid u8 operand, so bit pair l
// accumulates 4^l * sum(u * q) in its own register, divided exactly at the end. One AND per 64
// codes. No overflow: a lane adds 4 products of at most 2^14 per block, K / 256 * 2^16 < 2^31.
__attribute__((target("avx512f,avx512bw,avx512vnni"))) void rows_vnni_one_token(const Job& job, int64_t n0,
                                                                                int64_t n1) {
  const __m512i masks[4] = {_mm512_set1_epi8(0x03), _mm512_set1_epi8(0x0c), _mm512_set1_epi8(0x30),
                            _mm512_set1_epi8(static_cast<char>(0xc0))};
  const int64_t row_bytes = job.blocks * kBlockBytes;
  int64_t n = n0;
  for (; n + 1 < n1; n += 2) {
    const uint8_t* row = job.codes + n * row_bytes;
    __m512i acc[2][4];
    for (int r = 0; r < 2; ++r)
      for (int l = 0; l < 4; ++l) acc[r][l] = _mm512_setzero_si512();
    for (int64_t b = 0; b < job.blocks; ++b) {
      const __m512i c0 = _mm512_loadu_si512(row + b * kBlockBytes);
      const __m512i c1 = _mm512_loadu_si512(row + row_bytes + b * kBlockBytes);
      const int8_t* a = job.q + b * kBlockColumns;
      for (int l = 0; l < 4; ++l) {
        const __m512i x = _mm512_loadu_si512(a + 64 * l);
        acc[0][l] = _mm512_dpbusd_epi32(acc[0][l], _mm512_and_si512(c0, masks[l]), x);
        acc[1][l] = _mm512_dpbusd_epi32(acc[1][l], _mm512_and_si512(c1, masks[l]), x);
      }
    }
    for (int r = 0; r < 2; ++r) {
      int32_t total = 0;
      for (int l = 0; l < 4; ++l) total += _mm512_reduce_add_epi32(acc[r][l]) >> (2 * l);  // exact multiples
      job.out[n + r] = total - job.sums[0];
    }
  }
  if (n < n1) rows_vnni<1>(job, n, n1);
}

template <int T>
void rows(int64_t isa, const Job& job, int64_t n0, int64_t n1) {
  if (isa == kVnni) return T == 1 ? rows_vnni_one_token(job, n0, n1) : rows_vnni<T>(job, n0, n1);
  if (isa == kAvx2) return rows_avx2<T>(job, n0, n1);
  rows_scalar<T>(job, n0, n1);
}

using RowsFn = void (*)(int64_t, const Job&, int64_t, int64_t);
constexpr RowsFn kRowsByTile[kTokenTile] = {rows<1>, rows<2>, rows<3>, rows<4>, rows<5>, rows<6>, rows<7>, rows<8>};

void check_codes(const at::Tensor& codes, int64_t in_features, int64_t isa) {
  TORCH_CHECK(codes.dtype() == at::kByte && codes.dim() == 2 && codes.is_contiguous() && codes.is_cpu(),
              "codes must be a contiguous 2-d uint8 CPU tensor");
  TORCH_CHECK(codes.size(1) % kBlockBytes == 0, "codes must have whole 64-byte blocks per row");
  TORCH_CHECK(in_features <= codes.size(1) / kBlockBytes * kBlockColumns,
              "the input has more columns than the codes hold");
  TORCH_CHECK(isa >= kScalar && isa <= best_isa(), "this CPU cannot run kernel ", isa);
}

// sum(w * q) for every token and output row, rows split over torch's intra-op threads.
at::Tensor accumulate(const Tokens& tokens, const at::Tensor& codes, int64_t isa) {
  const int64_t n_out = codes.size(0), blocks = codes.size(1) / kBlockBytes;
  at::Tensor out = at::empty({tokens.rows, n_out}, at::kInt);
  int32_t* data = out.data_ptr<int32_t>();
  const int64_t grain = std::max<int64_t>(kRowTile, (int64_t{1} << 16) / (blocks * kBlockColumns));
  at::parallel_for(0, n_out, grain, [&](int64_t begin, int64_t end) {
    for (int64_t n0 = begin; n0 < end; n0 += kRowTile)
      for (int64_t m0 = 0; m0 < tokens.rows; m0 += kTokenTile) {
        const Job job{codes.data_ptr<uint8_t>(), blocks, &tokens.q[m0 * tokens.padded], &tokens.sums[m0],
                      tokens.padded, data + m0 * n_out, n_out};
        kRowsByTile[std::min(kTokenTile, tokens.rows - m0) - 1](isa, job, n0, std::min(end, n0 + kRowTile));
      }
  });
  return out;
}

at::Tensor checked_input(const at::Tensor& x, const at::Tensor& codes, int64_t isa) {
  TORCH_CHECK(x.dim() == 2 && x.is_cpu() && x.dtype() == at::kFloat, "x must be a 2-d float32 CPU tensor");
  check_codes(codes, x.size(1), isa);
  return x.contiguous();
}

// q int8 [M, K] -> sum(w * q) int32 [M, N]: the integer product alone, for tests.
at::Tensor int8_product(const at::Tensor& q, const at::Tensor& codes, int64_t isa) {
  TORCH_CHECK(q.dim() == 2 && q.is_cpu() && q.dtype() == at::kChar, "q must be a 2-d int8 CPU tensor");
  check_codes(codes, q.size(1), isa);
  return accumulate(from_int8(q.contiguous(), codes.size(1) / kBlockBytes * kBlockColumns), codes, isa);
}

// x float [M, K] -> (sum(w * q) int32 [M, N], step float [M, 1]): BitLinear's integers and step.
std::tuple<at::Tensor, at::Tensor> integer_forward(const at::Tensor& x, const at::Tensor& codes, bool input_norm,
                                                   int64_t isa) {
  const int64_t padded = codes.size(1) / kBlockBytes * kBlockColumns;
  const Tokens tokens = quantize(checked_input(x, codes, isa), padded, input_norm, isa);
  at::Tensor steps = at::empty({tokens.rows, 1}, at::kFloat);
  std::copy(tokens.steps.begin(), tokens.steps.end(), steps.data_ptr<float>());
  return {accumulate(tokens, codes, isa), steps};
}

// The whole layer: y = sum(w * q) * (step * scale) + bias, float [M, N].
at::Tensor linear(const at::Tensor& x, const at::Tensor& codes, double scale, const std::optional<at::Tensor>& bias,
                  bool input_norm, int64_t isa) {
  const int64_t padded = codes.size(1) / kBlockBytes * kBlockColumns;
  const Tokens tokens = quantize(checked_input(x, codes, isa), padded, input_norm, isa);
  const at::Tensor acc = accumulate(tokens, codes, isa);
  const int64_t n_out = codes.size(0);
  TORCH_CHECK(!bias || (bias->dtype() == at::kFloat && bias->numel() == n_out), "bias must be float32 [out_features]");
  const at::Tensor b = bias ? bias->contiguous() : at::Tensor();
  at::Tensor y = at::empty({tokens.rows, n_out}, at::kFloat);
  const int32_t* a = acc.data_ptr<int32_t>();
  float* out = y.data_ptr<float>();
  for (int64_t m = 0; m < tokens.rows; ++m) {
    const float factor = tokens.steps[m] * static_cast<float>(scale);
    for (int64_t n = 0; n < n_out; ++n)
      out[m * n_out + n] = static_cast<float>(a[m * n_out + n]) * factor + (bias ? b.data_ptr<float>()[n] : 0.0f);
  }
  return y;
}

}  // namespace

TORCH_LIBRARY(ryzen_bitnet, m) {
  m.def("best_isa() -> int", &best_isa);
  m.def("int8_product(Tensor q, Tensor codes, int isa) -> Tensor", &int8_product);
  m.def("integer_forward(Tensor x, Tensor codes, bool input_norm, int isa) -> (Tensor, Tensor)", &integer_forward);
  m.def("linear(Tensor x, Tensor codes, float scale, Tensor? bias, bool input_norm, int isa) -> Tensor", &linear);
}
