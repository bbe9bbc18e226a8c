// Torch-free tests of the attention kernels' NaN and inf behaviour (csrc/include/idefics3_kit/
// attention_math.h, decode_amx.h): exp_neg, the softmax rows and the decode partials + combine on
// every path this CPU has (portable, AVX-512, AMX), against the reference's rules computed in
// double (attention_ref: float32 softmax, then P·V over every key, masked ones with weight 0):
//   * a NaN score, a +inf score, or scores all -inf make the whole row NaN;
//   * a masked key is -inf whatever its score (an infinite or NaN score of its own never counts);
//   * a NaN or infinite value multiplies its probability even when that is 0 (0 * NaN = NaN);
//   * a NaN in one row (query head) never changes another.
#include <idefics3_kit/attention_math.h>

#include <cmath>
#include <cstdio>
#include <functional>
#include <limits>
#include <random>
#include <vector>

#include "check.h"

namespace attn = idefics3_kit::attn;
using idefics3_kit::bf16_bits_to_float;
using idefics3_kit::float_to_bf16_rne;

namespace {

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
constexpr float kInf = std::numeric_limits<float>::infinity();

bool is_nan_bf16(uint16_t v) { return (v & 0x7F80u) == 0x7F80u && (v & 0x7Fu) != 0; }

bool avx2() {
#ifdef IK_HAVE_AVX2_DECODE
  return attn::avx2::available();
#else
  return false;
#endif
}

bool avx512() {
#ifdef IK_HAVE_AVX512_PATH
  return attn::avx512::available();
#else
  return false;
#endif
}

#ifdef IK_HAVE_AVX512_PATH
// 16 lanes through the vector kernels (callers check avx512() first).
IK_AVX512_FN void exp_neg16(const float* in, float* out) {
  _mm512_storeu_ps(out, attn::avx512::exp_neg(_mm512_loadu_ps(in)));
}
IK_AVX512_FN void store_bf16_16(const float* in, uint16_t* out) {
  attn::avx512::store(out, _mm512_loadu_ps(in), 0xFFFF);
}
#endif

// ---- exp_neg ---------------------------------------------------------------------------------

void test_exp_neg() {
  std::vector<float> xs = {0.0f, -0.5f, -1.0f, -10.0f, -86.9f, -87.0f, -87.5f, -1e30f, -kInf, kNaN, -kNaN};
  for (float x : xs) {
    const float got = attn::exp_neg(x);
    if (std::isnan(x)) {
      CHECK(std::isnan(got));
    } else if (x < -87.0f) {
      CHECK(got == 0.0f);
    } else {
      // ~1e-7 relative; near the bottom of the range the reduction's rounding (|t| ~ 125) shows
      CHECK(std::fabs(got - std::exp(x)) <= (x < -80.0f ? 5e-6f : 2e-7f) * std::exp(x));
    }
  }
#ifdef IK_HAVE_AVX512_PATH
  if (avx512()) {
    float in[16], out[16];
    for (int i = 0; i < 16; ++i) in[i] = xs[i % xs.size()];
    exp_neg16(in, out);
    for (int i = 0; i < 16; ++i) {
      const float scalar = attn::exp_neg(in[i]);
      CHECK(std::isnan(out[i]) == std::isnan(scalar));
      if (!std::isnan(scalar)) CHECK(std::fabs(out[i] - scalar) <= 5e-6f * scalar);
    }
  }
#endif
}

// ---- bf16 stores of NaN ------------------------------------------------------------------------

void test_vector_bf16_store_keeps_nan() {
#ifdef IK_HAVE_AVX512_PATH
  if (!avx512()) return;
  // The vector store rounds like float_to_bf16_rne for the values the bf16 kernels make: numbers,
  // infinities, and NaNs whose low 16 bits are 0 (bf16 payloads, the default NaN), which stay NaN.
  const uint32_t bits[16] = {0x7FC00000u, 0xFFC00000u, 0x7F810000u, 0xFFFF0000u, 0x7FFF0000u, 0xFF800000u,
                             0x7F800000u, 0x3F800000u, 0x3F808000u, 0x3F818000u, 0x7F7FFFFFu, 0x7F7F7FFFu,
                             0x00000001u, 0x80000000u, 0x3F807FFFu, 0x40490FDBu};
  float in[16];
  std::memcpy(in, bits, sizeof(in));
  uint16_t out[16];
  store_bf16_16(in, out);
  for (int i = 0; i < 5; ++i) CHECK(is_nan_bf16(out[i]));  // (a signaling payload is not quieted: still NaN)
  for (int i = 5; i < 16; ++i) CHECK(out[i] == float_to_bf16_rne(in[i]));  // the scalar conversion's bits
#endif
}

// ---- softmax rows ------------------------------------------------------------------------------

// The reference row in double: x_j = s_j * scale unless masked (bias -inf) or j >= valid.
std::vector<double> softmax_ref(const std::vector<float>& s, int valid, float scale, const std::vector<float>& bias) {
  const int n = static_cast<int>(s.size());
  std::vector<double> x(n, -INFINITY), p(n, 0.0);
  double mx = -INFINITY;
  bool nan = false;
  for (int j = 0; j < valid; ++j) {
    if (!bias.empty() && bias[j] != 0.0f) continue;
    x[j] = static_cast<double>(s[j]) * scale;
    nan |= std::isnan(x[j]);
    mx = std::max(mx, x[j]);
  }
  if (nan || mx == INFINITY || mx == -INFINITY) {  // NaN row (for j < valid; the rest is written 0)
    for (int j = 0; j < valid; ++j) p[j] = NAN;
    return p;
  }
  double sum = 0.0;
  for (int j = 0; j < valid; ++j) sum += std::exp(x[j] - mx);
  for (int j = 0; j < valid; ++j) p[j] = std::exp(x[j] - mx) / sum;
  return p;
}

using SoftmaxF = std::function<void(const float*, int, int, float, const uint16_t*, float*, float*)>;
using SoftmaxB = std::function<void(const uint16_t*, int, int, float, const uint16_t*, float*, uint16_t*)>;

void check_row(const std::vector<double>& want, const std::vector<float>& got, double tol) {
  for (size_t j = 0; j < want.size(); ++j) {
    CHECK(std::isnan(want[j]) == std::isnan(got[j]));
    if (!std::isnan(want[j])) CHECK(std::fabs(got[j] - want[j]) <= tol);
  }
}

void test_softmax_rows() {
  std::mt19937 rng(3);
  std::normal_distribution<float> dist(0.0f, 2.0f);
  std::vector<std::pair<const char*, SoftmaxF>> f32 = {{"portable", [](auto... a) { attn::softmax_row_portable(a...); }}};
  std::vector<std::pair<const char*, SoftmaxB>> b16 = {{"portable", [](auto... a) { attn::softmax_row_portable(a...); }}};
#ifdef IK_HAVE_AVX512_PATH
  if (avx512()) {
    f32.push_back({"avx512", [](auto... a) { attn::avx512::softmax_row<float, float>(a...); }});
    b16.push_back({"avx512", [](auto... a) { attn::avx512::softmax_row<uint16_t, uint16_t>(a...); }});
  }
#endif
  // (case, where): 0 clean, 1 NaN score, 2 +inf score, 3 -inf score, 4 all -inf, 5 masked +inf and
  // NaN scores, 6 masked NaN with an unmasked +inf elsewhere
  for (int n : {1, 5, 16, 17, 40, 100})
    for (int kase = 0; kase < 7; ++kase)
      for (bool masked : {false, true}) {
        std::vector<float> s(n), bias;
        for (auto& v : s) v = dist(rng);
        if (masked || kase >= 5) {
          bias.assign(n, 0.0f);
          for (int j = 1; j < n; j += 3) bias[j] = -kInf;
        }
        const int valid = kase % 2 ? n : std::max(1, n - n / 4);  // some rows cut like causal ones
        const int at = (n - 1) / 2 / 3 * 3;                         // an unmasked key (j % 3 == 0)
        if (kase == 1) s[at] = kNaN;
        if (kase == 2) s[at] = kInf;
        if (kase == 3) s[at] = -kInf;
        if (kase == 4) std::fill(s.begin(), s.end(), -kInf);
        if (kase >= 5 && n > 1) s[1] = kNaN, s[n > 4 ? 4 : 1] = kInf;  // masked keys (j % 3 == 1)
        if (kase == 6) s[0] = kInf;
        const std::vector<double> want = softmax_ref(s, valid, 0.7f, bias);
        std::vector<uint16_t> keep((n + 15) / 16, 0);  // the mask as the kernels take it
        for (int j = 0; j < n; ++j) keep[j / 16] |= static_cast<uint16_t>(bias.empty() || bias[j] == 0.0f) << (j % 16);
        const uint16_t* b = bias.empty() ? nullptr : keep.data();
        for (auto& [name, fn] : f32) {
          std::vector<float> x(n), p(n, -1.0f);
          fn(s.data(), n, valid, 0.7f, b, x.data(), p.data());
          check_row(want, p, 1e-6);
          for (int j = valid; j < n; ++j) CHECK(p[j] == 0.0f);
        }
        std::vector<uint16_t> sb(n);
        for (int j = 0; j < n; ++j) sb[j] = float_to_bf16_rne(s[j]);
        std::vector<float> sr(n);
        for (int j = 0; j < n; ++j) sr[j] = bf16_bits_to_float(sb[j]);
        const std::vector<double> want_b = softmax_ref(sr, valid, 0.7f, bias);
        for (auto& [name, fn] : b16) {
          std::vector<float> x(n), pf(n);
          std::vector<uint16_t> p(n, 0xFFFFu);
          fn(sb.data(), n, valid, 0.7f, b, x.data(), p.data());
          for (int j = 0; j < n; ++j) pf[j] = bf16_bits_to_float(p[j]);
          check_row(want_b, pf, 4e-3);
        }
      }
}

// ---- decode partials + combine -----------------------------------------------------------------

struct Case {
  int64_t d = 64, groups = 4, keys = 300;
  std::vector<float> q, k, v;  // q [G, d], k / v [keys, d]
  std::vector<uint8_t> mask;   // [keys], 1 = attend
  float scale = 0.125f;
};

Case make_case(uint32_t seed, int64_t d, int64_t groups, int64_t keys) {
  Case c;
  c.d = d, c.groups = groups, c.keys = keys;
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist(0.0f, 1.0f);
  for (auto* t : {&c.q, &c.k, &c.v}) {
    t->resize((t == &c.q ? groups : keys) * d);
    for (auto& x : *t) x = dist(rng);
  }
  c.mask.assign(keys, 1);
  for (int64_t j = 0; j < keys; j += 7) c.mask[j] = 0;
  return c;
}

// The reference (attention_ref's rules) in double; inputs already rounded as the kernel sees them.
std::vector<double> decode_ref(const Case& c) {
  const int64_t d = c.d;
  std::vector<double> out(c.groups * d, 0.0);
  for (int64_t g = 0; g < c.groups; ++g) {
    std::vector<double> s(c.keys, -INFINITY);
    double mx = -INFINITY;
    bool nan = false;
    for (int64_t j = 0; j < c.keys; ++j) {
      if (!c.mask[j]) continue;
      double acc = 0.0;
      for (int64_t i = 0; i < d; ++i) acc += static_cast<double>(c.q[g * d + i]) * c.k[j * d + i];
      s[j] = acc * c.scale;
      nan |= std::isnan(s[j]);
      mx = std::max(mx, s[j]);
    }
    double* og = out.data() + g * d;
    if (nan || mx == INFINITY || mx == -INFINITY) {
      for (int64_t i = 0; i < d; ++i) og[i] = NAN;
      continue;
    }
    double sum = 0.0;
    for (int64_t j = 0; j < c.keys; ++j) sum += c.mask[j] ? std::exp(s[j] - mx) : 0.0;
    for (int64_t j = 0; j < c.keys; ++j) {
      const double p = c.mask[j] ? std::exp(s[j] - mx) / sum : 0.0;
      for (int64_t i = 0; i < d; ++i) og[i] += p * c.v[j * d + i];  // masked: 0 * v, NaN for NaN / inf
    }
  }
  return out;
}

enum class Path { kPortable, kAvx2, kAvx512, kAmx };

// The kernel's output for all G heads over two key ranges (as two split items), combined.
template <typename in_t>
std::vector<float> decode_run(const Case& c, Path path, int64_t cut) {
  const int64_t d = c.d, G = c.groups;
  std::vector<in_t> q(c.q.size()), k(c.k.size()), v(c.v.size());
  auto conv = [](const std::vector<float>& src, std::vector<in_t>& dst) {
    for (size_t i = 0; i < src.size(); ++i) {
      if constexpr (sizeof(in_t) == 2) dst[i] = float_to_bf16_rne(src[i]);
      else dst[i] = src[i];
    }
  };
  conv(c.q, q), conv(c.k, k), conv(c.v, v);
  attn::DecodeArgs a;
  a.d = d, a.groups = G, a.scale = c.scale, a.q = q.data(), a.q_stride = d, a.k = k.data(), a.v = v.data();
  a.k_stride = d, a.v_stride = d, a.key_mask = c.mask.data();
  const int64_t ranges[3] = {0, cut, c.keys};
  std::vector<float> o(2 * G * d), m(2 * G), l(2 * G), qf(G * d), row(d), x(attn::decode_scratch_floats(G, c.keys));
  for (int s = 0; s < 2; ++s) {
    float *os = o.data() + s * G * d, *ms = m.data() + s * G, *ls = l.data() + s * G;
    switch (path) {
      case Path::kPortable:
        attn::decode_partial_portable<in_t>(a, ranges[s], ranges[s + 1], os, ms, ls, qf.data(), row.data(), x.data());
        break;
      case Path::kAvx2:
#ifdef IK_HAVE_AVX2_DECODE
        attn::avx2::decode_partial<in_t>(a, ranges[s], ranges[s + 1], os, ms, ls, qf.data(), x.data());
#endif
        break;
      case Path::kAvx512:
#ifdef IK_HAVE_AVX512_PATH
        attn::avx512::decode_partial<in_t>(a, ranges[s], ranges[s + 1], os, ms, ls, qf.data(), x.data());
#endif
        break;
      case Path::kAmx:
#ifdef IK_HAVE_AMX_PATH
        if constexpr (sizeof(in_t) == 2) attn::amx::decode_partial(a, ranges[s], ranges[s + 1], os, ms, ls);
#endif
        break;
    }
  }
  std::vector<float> out(G * d);
  for (int64_t g = 0; g < G; ++g)
    attn::decode_combine(d, 2, o.data() + g * d, G * d, m.data() + g, l.data() + g, G, out.data() + g * d);
  return out;
}

template <typename in_t>
void check_decode(const Case& c, Path path, const char* what, const Case* clean = nullptr,
                  int64_t poisoned_head = -1) {
  // The reference sees the inputs as the kernel does (rounded to bf16 for bf16 runs).
  Case rounded = c;
  if constexpr (sizeof(in_t) == 2)
    for (auto* t : {&rounded.q, &rounded.k, &rounded.v})
      for (auto& x : *t) x = bf16_bits_to_float(float_to_bf16_rne(x));
  const std::vector<double> want = decode_ref(rounded);
  const double tol = sizeof(in_t) == 2 ? 3e-2 : 2e-5;
  for (int64_t cut : {int64_t{0}, int64_t{137}, c.keys}) {
    const std::vector<float> got = decode_run<in_t>(c, path, cut);
    int bad = 0;
    for (size_t i = 0; i < want.size(); ++i) {
      const bool ok = std::isnan(want[i]) ? std::isnan(got[i])
                      : std::isinf(want[i]) ? got[i] == want[i]
                                            : std::fabs(got[i] - want[i]) <= tol;
      bad += !ok;
    }
    if (bad) std::fprintf(stderr, "decode %s (%s, %zu-byte inputs, cut %lld): %d of %zu wrong\n", what,
                          path == Path::kPortable ? "portable" : path == Path::kAvx2 ? "avx2"
                                                      : path == Path::kAvx512 ? "avx512" : "amx",
                          sizeof(in_t), static_cast<long long>(cut), bad, want.size());
    CHECK(bad == 0);
    if (clean) {  // the other heads are bit for bit what they were without the NaN
      const std::vector<float> base = decode_run<in_t>(*clean, path, cut);
      for (int64_t g = 0; g < c.groups; ++g)
        if (g != poisoned_head) CHECK(std::memcmp(got.data() + g * c.d, base.data() + g * c.d, c.d * 4) == 0);
    }
  }
}

template <typename in_t>
void decode_cases(Path path, int64_t d, int64_t groups) {
  const Case clean = make_case(11, d, groups, 300);
  check_decode<in_t>(clean, path, "clean");
  Case c = clean;
  c.q[1 * d + 5] = kNaN;  // a NaN query head
  check_decode<in_t>(c, path, "NaN in q head 1", &clean, 1);
  c = clean;
  c.v[7 * d + 3] = kNaN;  // key 7 is masked: its value still poisons column 3
  check_decode<in_t>(c, path, "NaN value of a masked key");
  c = clean;
  c.v[14 * d + 2] = kInf;  // masked: 0 * inf = NaN
  c.v[200 * d + 6] = -kInf;  // attended: -inf in column 6
  check_decode<in_t>(c, path, "infinite values");
  c = clean;
  c.k[50 * d + 0] = kInf;  // heads with q[0] > 0 score +inf (NaN rows), the others -inf (weight 0)
  check_decode<in_t>(c, path, "infinite key");
  c = clean;
  c.k[21 * d + 1] = kNaN;  // a masked key's NaN score never counts
  c.k[28 * d + 1] = kInf;
  check_decode<in_t>(c, path, "NaN and inf keys, masked");
  c = clean;
  std::fill(c.mask.begin(), c.mask.begin() + 137, uint8_t{0});  // the first split entirely masked
  c.v[3 * d + 4] = kNaN;                                         // ... and poisoning column 4
  check_decode<in_t>(c, path, "first split masked");
  c = clean;
  for (int64_t j = 0; j < c.keys; ++j) c.k[j * d] = std::fabs(c.k[j * d]) + 0.5f;
  Case base = c;
  c.q[2 * d] = -kInf;  // every score of head 2 is -inf: NaN (softmax of an all -inf row)
  check_decode<in_t>(c, path, "all scores -inf", &base, 2);
}

void test_decode_partials() {
  for (int64_t d : {40, 64}) {  // 40: not an AMX shape
    decode_cases<float>(Path::kPortable, d, 4);
    decode_cases<uint16_t>(Path::kPortable, d, 4);
    if (avx2()) {  // sweeps of 4, 3, 4 + 1 and 4 + 2 heads: every width the AVX2 path has
      for (int64_t groups : {4, 3, 5, 6}) {
        decode_cases<float>(Path::kAvx2, d, groups);
        decode_cases<uint16_t>(Path::kAvx2, d, groups);
      }
    }
    if (avx512()) {  // bf16 where the CPU has AVX-512 BF16: the VDPBF16PS sweeps of 4, 3, 4 + 1, 4 + 2 heads
      decode_cases<float>(Path::kAvx512, d, 4);
      for (int64_t groups : {4, 3, 5, 6}) decode_cases<uint16_t>(Path::kAvx512, d, groups);
    }
  }
#ifdef IK_HAVE_AMX_PATH
  if (attn::amx::usable(64, 4)) {
    decode_cases<uint16_t>(Path::kAmx, 64, 4);
    decode_cases<uint16_t>(Path::kAmx, 128, 16);
    std::printf("decode: AMX path tested\n");
  } else {
    std::printf("decode: AMX path not tested (the CPU or the kernel does not allow it)\n");
  }
#endif
  std::printf("decode: AVX2 path %s\n", avx2() ? "tested" : "not tested (CPU)");
  std::printf("decode: AVX-512 path %s\n", avx512() ? "tested" : "not tested (CPU)");
#ifdef IK_HAVE_DECODE_BF16DOT
  std::printf("decode: AVX-512 BF16 (VDPBF16PS) path %s\n", attn::avx512::bf16dot_available() ? "tested" : "not tested (CPU)");
#endif
}

void test_any_nonfinite() {
  std::vector<float> f(37, 1.0f);
  CHECK(!attn::any_nonfinite(f.data(), 37));
  for (float bad : {kNaN, kInf, -kInf}) {
    f[36] = bad;
    CHECK(attn::any_nonfinite(f.data(), 37));
    CHECK(!attn::any_nonfinite(f.data(), 36));
    f[36] = 1.0f;
  }
  f[5] = std::numeric_limits<float>::max();
  CHECK(!attn::any_nonfinite(f.data(), 37));
  std::vector<uint16_t> b(20, float_to_bf16_rne(2.0f));
  CHECK(!attn::any_nonfinite(b.data(), 20));
  b[19] = 0x7FC0u;
  CHECK(attn::any_nonfinite(b.data(), 20));
  b[19] = 0xFF80u;
  CHECK(attn::any_nonfinite(b.data(), 20));
  b[19] = 0x7F7Fu;  // the largest finite bf16
  CHECK(!attn::any_nonfinite(b.data(), 20));
}

}  // namespace

TEST_MAIN(test_exp_neg(); test_vector_bf16_store_keeps_nan(); test_softmax_rows(); test_decode_partials();
          test_any_nonfinite();)
