// Ternary weights (2-bit codes) times int8 activations on the CPU, for decode and small batches.
//
// Layout (see cpp_kernel.py): output rows in groups of 16, input columns in chunks of 16, one 64-byte
// block per (group, chunk), groups one after another. Byte 4r + i of a block holds the codes u = w + 1
// of row r, columns 4l + i (l = 0..3) in bits 2l, 2l + 1. So one AND (and a shift) gives, per 32-bit
// lane = per row, the four codes that dpbusd multiplies by the same four activations broadcast to
// every lane: sixteen rows' sums in one register, no horizontal reduction. Padding rows and columns
// have code 1 (w = 0), padding activations are 0. Each token is quantized to int8 exactly as quant.py
// does (absmax, round half to even), then sum(u * q) - sum(q) = sum(w * q), exact in int32.
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
#include <cstring>
#include <vector>

namespace {

constexpr int64_t kGroupRows = 16, kChunkColumns = 16, kChunkBytes = 64;
constexpr int64_t kTokenTile = 8;  // tokens sharing one unpacking of the codes
constexpr int64_t kGroupTile = 4;  // groups whose codes stay in L1 while every token tile passes over them
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

// Activations of M tokens as the kernels read them: int8, each row padded with zeros to whole chunks.
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

// What every kernel gets: groups [g0, g1) of 16 rows, T tokens from `q` (stride `padded`), and writes
// out[t * n_out + n] = sum(w * q) for the rows n < n_out of those groups.
struct Job {
  const uint8_t* codes;
  int64_t chunks;  // 16-column chunks per row: 64 bytes per group each
  const int8_t* q;
  const int32_t* sums;
  int64_t padded;
  int32_t* out;
  int64_t n_out;
};

int32_t word(const int8_t* q) {  // four int8 activations as the 32-bit word dpbusd / maddubs broadcast
  int32_t w;
  std::memcpy(&w, q, sizeof w);
  return w;
}

template <int T>
void groups_scalar(const Job& job, int64_t g0, int64_t g1) {
  for (int64_t g = g0; g < g1; ++g)
    for (int64_t r = 0; r < kGroupRows && g * kGroupRows + r < job.n_out; ++r)
      for (int t = 0; t < T; ++t) {
        const int8_t* a = job.q + t * job.padded;
        int32_t acc = 0;
        for (int64_t c = 0; c < job.chunks; ++c)
          for (int i = 0; i < 4; ++i) {
            const int32_t byte = job.codes[(g * job.chunks + c) * kChunkBytes + 4 * r + i];
            for (int l = 0; l < 4; ++l) acc += (byte >> (2 * l) & 3) * a[c * kChunkColumns + 4 * l + i];
          }
        job.out[t * job.n_out + g * kGroupRows + r] = acc - job.sums[t];
      }
}

// AVX2, eight rows per half chunk: maddubs multiplies u8 codes by the broadcast s8 activations and adds
// pairs into int16; |pair| <= 2 * 2 * 128 = 512 and the four bit pairs add up to at most 2048: no
// int16 saturation. madd with ones widens to the row's int32 lane.
template <int T>
__attribute__((target("avx2"))) void groups_avx2(const Job& job, int64_t g0, int64_t g1) {
  const __m256i mask = _mm256_set1_epi8(3), ones = _mm256_set1_epi16(1);
  for (int64_t g = g0; g < g1; ++g)
    for (int64_t half = 0; half < 2; ++half) {
      __m256i acc[T];
      for (int t = 0; t < T; ++t) acc[t] = _mm256_setzero_si256();
      for (int64_t c = 0; c < job.chunks; ++c) {
        const __m256i v = _mm256_loadu_si256(
            reinterpret_cast<const __m256i*>(job.codes + (g * job.chunks + c) * kChunkBytes + 32 * half));
        const __m256i u[4] = {_mm256_and_si256(v, mask), _mm256_and_si256(_mm256_srli_epi16(v, 2), mask),
                              _mm256_and_si256(_mm256_srli_epi16(v, 4), mask),
                              _mm256_and_si256(_mm256_srli_epi16(v, 6), mask)};
        for (int t = 0; t < T; ++t) {
          const int8_t* a = job.q + t * job.padded + c * kChunkColumns;
          __m256i pairs = _mm256_maddubs_epi16(u[0], _mm256_set1_epi32(word(a)));
          for (int l = 1; l < 4; ++l)
            pairs = _mm256_add_epi16(pairs, _mm256_maddubs_epi16(u[l], _mm256_set1_epi32(word(a + 4 * l))));
          acc[t] = _mm256_add_epi32(acc[t], _mm256_madd_epi16(pairs, ones));
        }
      }
      const int64_t row0 = g * kGroupRows + 8 * half, rows = std::min<int64_t>(8, job.n_out - row0);
      for (int t = 0; t < T; ++t) {
        alignas(32) int32_t lanes[8];
        _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), acc[t]);
        for (int64_t r = 0; r < rows; ++r) job.out[t * job.n_out + row0 + r] = lanes[r] - job.sums[t];
      }
    }
}

// acc += dpbusd(u, x) in place. Through the intrinsic GCC 12 copies each accumulator into a fresh
// register and back around every dpbusd in these loops (one extra move each); the asm pins it.
__attribute__((target("avx512f,avx512bw,avx512vnni"), always_inline)) inline void dpbusd(__m512i& acc, __m512i u,
                                                                                         __m512i x) {
  asm("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(u), "v"(x));
}

// AVX-512 VNNI, sixteen rows per chunk: dpbusd adds the four u8 x s8 products of a row's lane into its
// int32. With one or two tokens each bit pair l gets its own accumulator and is not shifted down:
// `v & (3 << 2l)` is 4^l * u <= 128, a valid u8 operand, and the lanes are exact multiples of 4^l,
// divided exactly at the end: one AND per bit pair, and four independent dpbusd chains per token.
// More tokens give enough chains by themselves and shift the codes down instead (fewer registers).
// No overflow: a lane adds at most 4 * 2^14 per chunk, and K <= 2^19 (checked).
template <int T>
__attribute__((target("avx512f,avx512bw,avx512vnni"))) void groups_vnni(const Job& job, int64_t g0, int64_t g1) {
  constexpr bool kScaled = T <= 2;
  constexpr int L = kScaled ? 4 : 1;
  const __m512i masks[4] = {_mm512_set1_epi8(0x03), _mm512_set1_epi8(0x0c), _mm512_set1_epi8(0x30),
                            _mm512_set1_epi8(static_cast<char>(0xc0))};
  for (int64_t g = g0; g < g1; ++g) {
    __m512i acc[T][L];
    for (int t = 0; t < T; ++t)
      for (int l = 0; l < L; ++l) acc[t][l] = _mm512_setzero_si512();
    for (int64_t c = 0; c < job.chunks; ++c) {
      const __m512i v = _mm512_loadu_si512(job.codes + (g * job.chunks + c) * kChunkBytes);
      __m512i u[4];
      for (int l = 0; l < 4; ++l)
        u[l] = kScaled ? _mm512_and_si512(v, masks[l]) : _mm512_and_si512(_mm512_srli_epi16(v, 2 * l), masks[0]);
      for (int t = 0; t < T; ++t) {
        const int8_t* a = job.q + t * job.padded + c * kChunkColumns;
        for (int l = 0; l < 4; ++l)
          dpbusd(acc[t][l % L], u[l], _mm512_set1_epi32(word(a + 4 * l)));
      }
    }
    const int64_t row0 = g * kGroupRows;
    const __mmask16 valid = static_cast<__mmask16>((1u << std::min<int64_t>(kGroupRows, job.n_out - row0)) - 1);
    for (int t = 0; t < T; ++t) {
      __m512i total = _mm512_set1_epi32(-job.sums[t]);
      for (int l = 0; l < L; ++l) total = _mm512_add_epi32(total, _mm512_srai_epi32(acc[t][l], kScaled ? 2 * l : 0));
      _mm512_mask_storeu_epi32(job.out + t * job.n_out + row0, valid, total);
    }
  }
}

// One token (decode), two groups at a time: the broadcast activations serve 32 rows, and named
// accumulators keep GCC from copying an array of them around the loop (it did, one move per dpbusd).
__attribute__((target("avx512f,avx512bw,avx512vnni"))) void groups_vnni_one_token(const Job& job, int64_t g0,
                                                                                  int64_t g1) {
  const __m512i m0 = _mm512_set1_epi8(0x03), m1 = _mm512_set1_epi8(0x0c), m2 = _mm512_set1_epi8(0x30),
                m3 = _mm512_set1_epi8(static_cast<char>(0xc0));
  const int64_t group_bytes = job.chunks * kChunkBytes;
  int64_t g = g0;
  for (; g + 1 < g1; g += 2) {
    const uint8_t* first = job.codes + g * group_bytes;
    __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
    for (int64_t c = 0; c < job.chunks; ++c) {
      const __m512i v = _mm512_loadu_si512(first + c * kChunkBytes);
      const __m512i w = _mm512_loadu_si512(first + group_bytes + c * kChunkBytes);
      const int8_t* a = job.q + c * kChunkColumns;
      const __m512i x0 = _mm512_set1_epi32(word(a)), x1 = _mm512_set1_epi32(word(a + 4)),
                    x2 = _mm512_set1_epi32(word(a + 8)), x3 = _mm512_set1_epi32(word(a + 12));
      dpbusd(a0, _mm512_and_si512(v, m0), x0);
      dpbusd(b0, _mm512_and_si512(w, m0), x0);
      dpbusd(a1, _mm512_and_si512(v, m1), x1);
      dpbusd(b1, _mm512_and_si512(w, m1), x1);
      dpbusd(a2, _mm512_and_si512(v, m2), x2);
      dpbusd(b2, _mm512_and_si512(w, m2), x2);
      dpbusd(a3, _mm512_and_si512(v, m3), x3);
      dpbusd(b3, _mm512_and_si512(w, m3), x3);
    }
    const __m512i sum = _mm512_set1_epi32(-job.sums[0]);
    const __m512i first_rows = _mm512_add_epi32(
        _mm512_add_epi32(_mm512_add_epi32(sum, a0), _mm512_srai_epi32(a1, 2)),
        _mm512_add_epi32(_mm512_srai_epi32(a2, 4), _mm512_srai_epi32(a3, 6)));
    const __m512i second_rows = _mm512_add_epi32(
        _mm512_add_epi32(_mm512_add_epi32(sum, b0), _mm512_srai_epi32(b1, 2)),
        _mm512_add_epi32(_mm512_srai_epi32(b2, 4), _mm512_srai_epi32(b3, 6)));
    const int64_t row0 = g * kGroupRows;
    _mm512_storeu_si512(job.out + row0, first_rows);  // the first group is whole: another follows it
    const int64_t rest = std::min<int64_t>(kGroupRows, job.n_out - row0 - kGroupRows);
    _mm512_mask_storeu_epi32(job.out + row0 + kGroupRows, static_cast<__mmask16>((1u << rest) - 1), second_rows);
  }
  if (g < g1) groups_vnni<1>(job, g, g1);
}

template <int T>
void groups(int64_t isa, const Job& job, int64_t g0, int64_t g1) {
  if (isa == kVnni) return T == 1 ? groups_vnni_one_token(job, g0, g1) : groups_vnni<T>(job, g0, g1);
  if (isa == kAvx2) return groups_avx2<T>(job, g0, g1);
  groups_scalar<T>(job, g0, g1);
}

using GroupsFn = void (*)(int64_t, const Job&, int64_t, int64_t);
constexpr GroupsFn kGroupsByTile[kTokenTile] = {groups<1>, groups<2>, groups<3>, groups<4>,
                                                groups<5>, groups<6>, groups<7>, groups<8>};

int64_t padded_columns(const at::Tensor& codes) { return codes.size(1) / kChunkBytes * kChunkColumns; }

void check_codes(const at::Tensor& codes, int64_t n_out, int64_t in_features, int64_t isa) {
  TORCH_CHECK(codes.dtype() == at::kByte && codes.dim() == 2 && codes.is_contiguous() && codes.is_cpu(),
              "codes must be a contiguous 2-d uint8 CPU tensor");
  TORCH_CHECK(codes.size(0) == (n_out + kGroupRows - 1) / kGroupRows && codes.size(1) % kChunkBytes == 0,
              "codes must hold ceil(out_features / 16) groups of whole 64-byte chunks");
  TORCH_CHECK(in_features <= padded_columns(codes), "the input has more columns than the codes hold");
  TORCH_CHECK(padded_columns(codes) <= (int64_t{1} << 19), "in_features above 2^19 could overflow int32");
  TORCH_CHECK(isa >= kScalar && isa <= best_isa(), "this CPU cannot run kernel ", isa);
}

// sum(w * q) for every token and output row; groups of rows split over torch's intra-op threads.
at::Tensor accumulate(const Tokens& tokens, const at::Tensor& codes, int64_t n_out, int64_t isa) {
  const int64_t chunks = codes.size(1) / kChunkBytes;
  at::Tensor out = at::empty({tokens.rows, n_out}, at::kInt);
  int32_t* data = out.data_ptr<int32_t>();
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 18) / (chunks * kChunkColumns * kGroupRows));
  at::parallel_for(0, codes.size(0), grain, [&](int64_t begin, int64_t end) {
    for (int64_t g0 = begin; g0 < end; g0 += kGroupTile)
      for (int64_t m0 = 0; m0 < tokens.rows; m0 += kTokenTile) {
        const Job job{codes.data_ptr<uint8_t>(), chunks, &tokens.q[m0 * tokens.padded], &tokens.sums[m0],
                      tokens.padded, data + m0 * n_out, n_out};
        kGroupsByTile[std::min(kTokenTile, tokens.rows - m0) - 1](isa, job, g0, std::min(end, g0 + kGroupTile));
      }
  });
  return out;
}

at::Tensor checked_input(const at::Tensor& x, const at::Tensor& codes, int64_t n_out, int64_t isa) {
  TORCH_CHECK(x.dim() == 2 && x.is_cpu() && x.dtype() == at::kFloat, "x must be a 2-d float32 CPU tensor");
  check_codes(codes, n_out, x.size(1), isa);
  return x.contiguous();
}

// q int8 [M, K] -> sum(w * q) int32 [M, N]: the integer product alone, for tests.
at::Tensor int8_product(const at::Tensor& q, const at::Tensor& codes, int64_t n_out, int64_t isa) {
  TORCH_CHECK(q.dim() == 2 && q.is_cpu() && q.dtype() == at::kChar, "q must be a 2-d int8 CPU tensor");
  check_codes(codes, n_out, q.size(1), isa);
  return accumulate(from_int8(q.contiguous(), padded_columns(codes)), codes, n_out, isa);
}

// x float [M, K] -> (sum(w * q) int32 [M, N], step float [M, 1]): BitLinear's integers and step.
std::tuple<at::Tensor, at::Tensor> integer_forward(const at::Tensor& x, const at::Tensor& codes, int64_t n_out,
                                                   bool input_norm, int64_t isa) {
  const Tokens tokens = quantize(checked_input(x, codes, n_out, isa), padded_columns(codes), input_norm, isa);
  at::Tensor steps = at::empty({tokens.rows, 1}, at::kFloat);
  std::copy(tokens.steps.begin(), tokens.steps.end(), steps.data_ptr<float>());
  return {accumulate(tokens, codes, n_out, isa), steps};
}

// The whole layer: y = sum(w * q) * (step * scale) + bias, float [M, N].
at::Tensor linear(const at::Tensor& x, const at::Tensor& codes, int64_t n_out, double scale,
                  const std::optional<at::Tensor>& bias, bool input_norm, int64_t isa) {
  const Tokens tokens = quantize(checked_input(x, codes, n_out, isa), padded_columns(codes), input_norm, isa);
  const at::Tensor acc = accumulate(tokens, codes, n_out, isa);
  TORCH_CHECK(!bias || (bias->dtype() == at::kFloat && bias->numel() == n_out), "bias must be float32 [out_features]");
  const at::Tensor b = bias ? bias->contiguous() : at::Tensor();
  const float* bias_data = bias ? b.data_ptr<float>() : nullptr;
  at::Tensor y = at::empty({tokens.rows, n_out}, at::kFloat);
  const int32_t* a = acc.data_ptr<int32_t>();
  float* out = y.data_ptr<float>();
  for (int64_t m = 0; m < tokens.rows; ++m) {
    const float factor = tokens.steps[m] * static_cast<float>(scale);
    for (int64_t n = 0; n < n_out; ++n)
      out[m * n_out + n] = static_cast<float>(a[m * n_out + n]) * factor + (bias_data ? bias_data[n] : 0.0f);
  }
  return y;
}

}  // namespace

TORCH_LIBRARY(ryzen_bitnet, m) {
  m.def("best_isa() -> int", &best_isa);
  m.def("int8_product(Tensor q, Tensor codes, int out_features, int isa) -> Tensor", &int8_product);
  m.def("integer_forward(Tensor x, Tensor codes, int out_features, bool input_norm, int isa) -> (Tensor, Tensor)",
        &integer_forward);
  m.def("linear(Tensor x, Tensor codes, int out_features, float scale, Tensor? bias, bool input_norm, int isa) -> Tensor",
        &linear);
}
