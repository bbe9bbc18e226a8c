// Torch-free test of the two CPU flash-attention kernels, the AMX one (vision_amx.h) and the AVX-512
// BF16 one (vision_avx512.h), each on a CPU that has it, against a double-precision
// softmax(q k^T * scale) v: every head dim they take (8 to 128 in steps of 8: each of the AMX
// kernel's three tile layouts and each register blocking of the AVX-512 one, and dims that are not a
// multiple of 16 or 32, whose zero padding must not leak), query and key counts around both
// kernels' blocks (16 x 32 and 12 x 64), strided rows (the [N, L, H, hd] layout of the projections), no
// mask, a random key mask, a mask that hides every key (zeros out), scores spread wide enough
// to make the lazy running maximum rescale, and the causal mode of the decoder's prefill (query i
// at key position lk - lq + i: blocks across the diagonal masked per row, the ones past it
// skipped, rows that see no key written as zeros). Buffers are sized exactly, so ASan sees any read past
// a row, a tail block or a packed buffer.
#include <idefics3_kit/vision_amx.h>
#include <idefics3_kit/vision_avx512.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <random>
#include <vector>

#include "check.h"

#ifdef IK_HAVE_FLASH_AVX512
namespace flash = idefics3_kit::attn::flash;
using idefics3_kit::bf16_bits_to_float;
using idefics3_kit::float_to_bf16_rne;

namespace {

// The two kernels behind one face: whether this CPU runs it for head dim d, and one head.
struct AmxKernel {
  static constexpr const char* kName = "vision_amx";
#ifdef IK_HAVE_AMX_PATH
  idefics3_kit::attn::vamx::Scratch scratch;
  static bool usable(int64_t d) { return idefics3_kit::attn::vamx::usable(d); }
  static int64_t max_dim() { return idefics3_kit::attn::vamx::kMaxDim; }
  void run(const flash::Head& h) {
    idefics3_kit::attn::vamx::configure();
    idefics3_kit::attn::vamx::run_head(h, scratch);
    idefics3_kit::attn::vamx::release();
  }
#else
  static bool usable(int64_t) { return false; }
  static int64_t max_dim() { return 0; }
  void run(const flash::Head&) {}
#endif
};

struct Avx512Kernel {
  static constexpr const char* kName = "vision_avx512";
  idefics3_kit::attn::vavx::Scratch scratch;
  static bool usable(int64_t d) { return idefics3_kit::attn::vavx::usable(d); }
  static int64_t max_dim() { return idefics3_kit::attn::vavx::kMaxDim; }
  void run(const flash::Head& h) { idefics3_kit::attn::vavx::run_head(h, scratch); }
};

struct Case {
  int64_t lq, lk, d, stride;  // stride: elements between rows (>= d)
  int mask;                   // 0 none, 1 random, 2 every key hidden
  float spread;               // std of q (wider scores: more rescaling)
  bool causal = false;        // query i sees keys up to lk - lq + i (needs lq <= lk)
};

template <typename K>
void run(const Case& t, std::mt19937& rng, K& kernel) {
  std::normal_distribution<float> normal(0.0f, 1.0f);
  auto fill = [&](int64_t rows, float std) {
    std::vector<uint16_t> x(rows * t.stride, 0x7FC0);  // NaN between rows: must never be read
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t e = 0; e < t.d; ++e) x[r * t.stride + e] = float_to_bf16_rne(normal(rng) * std);
    return x;
  };
  const std::vector<uint16_t> q = fill(t.lq, t.spread), k = fill(t.lk, 1.0f), v = fill(t.lk, 1.0f);
  std::vector<uint8_t> keep(t.lk, 1);
  if (t.mask == 1)
    for (auto& m : keep) m = std::uniform_int_distribution<int>(0, 3)(rng) != 0;
  if (t.mask == 2) std::fill(keep.begin(), keep.end(), 0);
  std::vector<uint16_t> out(t.lq * t.stride, 0xDEAD);
  const float scale = 1.0f / std::sqrt(static_cast<float>(t.d));
  const flash::Head h{q.data(), k.data(), v.data(), out.data(), t.lq, t.lk, t.d, t.stride, t.stride, t.stride, t.stride,
                      t.mask ? keep.data() : nullptr, scale, t.causal};
  kernel.run(h);
  double vmax = 0.0;
  for (int64_t j = 0; j < t.lk; ++j)
    for (int64_t e = 0; e < t.d; ++e) vmax = std::max(vmax, std::fabs(double(bf16_bits_to_float(v[j * t.stride + e]))));
  for (int64_t i = 0; i < t.lq; ++i) {
    std::vector<double> p(t.lk, 0.0);
    double top = -INFINITY, sum = 0.0;
    auto hidden = [&](int64_t j) { return (!keep[j] && t.mask) || (t.causal && j > t.lk - t.lq + i); };
    for (int64_t j = 0; j < t.lk; ++j) {
      if (hidden(j)) continue;
      double s = 0.0;
      for (int64_t e = 0; e < t.d; ++e)
        s += double(bf16_bits_to_float(q[i * t.stride + e])) * bf16_bits_to_float(k[j * t.stride + e]);
      p[j] = s * scale;
      top = std::max(top, p[j]);
    }
    for (int64_t j = 0; j < t.lk; ++j) {
      p[j] = hidden(j) ? 0.0 : std::exp(p[j] - top);
      sum += p[j];
    }
    for (int64_t e = 0; e < t.d; ++e) {
      double ref = 0.0;
      for (int64_t j = 0; j < t.lk; ++j) ref += p[j] * bf16_bits_to_float(v[j * t.stride + e]);
      ref = sum > 0 ? ref / sum : 0.0;
      const double got = bf16_bits_to_float(out[i * t.stride + e]);
      // P rounded to bf16 (2^-9 of each weight, so 2^-9 of max|v|), the output's own rounding, and
      // fp32 scores / sums
      const double bound = std::ldexp(vmax, -8) + std::ldexp(std::fabs(ref), -8) + 1e-6;
      if (!(std::fabs(got - ref) <= bound))
        std::fprintf(stderr, "%s: lq %lld lk %lld d %lld mask %d causal %d: out[%lld, %lld] = %g, reference %g\n",
                     K::kName, (long long)t.lq, (long long)t.lk, (long long)t.d, t.mask, int(t.causal), (long long)i, (long long)e,
                     got, ref);
      CHECK(std::fabs(got - ref) <= bound);
    }
    for (int64_t e = t.d; e < t.stride; ++e) CHECK(out[i * t.stride + e] == 0xDEAD);  // nothing past the row
  }
}

template <typename K>
void test_against_double() {
  if (!K::usable(64)) {
    std::printf("%s: this CPU lacks it, not tested here\n", K::kName);
    return;
  }
  std::mt19937 rng(17);
  K kernel;
  for (int64_t d = 8; d <= K::max_dim(); d += 8)
    for (int64_t lq : {1, 11, 12, 13, 15, 16, 17, 40})
      for (int64_t lk : {1, 31, 32, 33, 63, 64, 65, 70, 130})
        for (int mask : {0, 1, 2}) run({lq, lk, d, d + 8 * (lq % 2), mask, 1.0f}, rng, kernel);
  // wide scores: rows whose maximum arrives late force the lazy rescale of partial outputs (in
  // tiles for d <= 80, in the fp32 buffer above)
  for (int64_t d : {64, 72, 128})
    for (int64_t lk : {64, 200}) run({20, lk, d, d, 0, 6.0f}, rng, kernel);
  run({16, 1024, 64, 64 * 12, 1, 3.0f}, rng, kernel);
  run({16, 729, 72, 72 * 16, 1, 3.0f}, rng, kernel);  // SigLIP-so400m: 16 heads of 72, 27 x 27 patches
  // causal (the decoder's prefill): square and with a longer key prefix, query blocks that end
  // inside a key block, masks (a left-padding mask leaves the first rows with no key: zeros)
  for (int64_t d : {8, 64, 72, 128})
    for (int64_t lq : {1, 12, 13, 15, 16, 17, 40, 100})
      for (int64_t extra : {0, 1, 31, 33, 63, 65})
        for (int mask : {0, 1, 2}) run({lq, lq + extra, d, d + 8 * (lq % 2), mask, 1.0f, true}, rng, kernel);
  run({200, 200, 64, 64, 0, 6.0f, true}, rng, kernel);  // wide scores: the lazy rescale across diagonal blocks
  // the head dims it refuses
  for (int64_t d : {0, 4, 12, 136, 256}) CHECK(!K::usable(d));
}

// A NaN query makes its own row NaN and leaves the others as they were.
template <typename K>
void test_nan_query_spoils_only_its_row() {
  if (!K::usable(64)) return;
  const int64_t lq = 20, lk = 40, d = 64;
  std::mt19937 rng(5);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<uint16_t> q(lq * d), k(lk * d), v(lk * d), a(lq * d), b(lq * d);
  for (auto* t : {&q, &k, &v})
    for (auto& x : *t) x = float_to_bf16_rne(normal(rng));
  K kernel;
  kernel.run({q.data(), k.data(), v.data(), a.data(), lq, lk, d, d, d, d, d, nullptr, 0.125f});
  q[3 * d + 7] = 0x7FC0;  // NaN in row 3
  kernel.run({q.data(), k.data(), v.data(), b.data(), lq, lk, d, d, d, d, d, nullptr, 0.125f});
  for (int64_t i = 0; i < lq; ++i)
    for (int64_t e = 0; e < d; ++e) {
      if (i == 3)
        CHECK(std::isnan(bf16_bits_to_float(b[i * d + e])));
      else
        CHECK(a[i * d + e] == b[i * d + e]);
    }
}

}  // namespace

TEST_MAIN(test_against_double<AmxKernel>(); test_nan_query_spoils_only_its_row<AmxKernel>();
          test_against_double<Avx512Kernel>(); test_nan_query_spoils_only_its_row<Avx512Kernel>();)
#else
TEST_MAIN(std::printf("no AVX-512 flash-attention path in this build\n");)
#endif
