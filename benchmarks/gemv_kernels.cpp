// The few-row decode GEMV kernels alone (bf16, int8, int4), torch-free, over the weights of
// SmolVLM-256M's decoder (30 layers of q|k|v, o, gate|up, down): milliseconds per pass and the
// GB/s of weights read, for 1-8 x rows, on one thread and on two (OpenMP, each thread one
// contiguous range of rows, as csrc/cpu/common.h's for_worker_row_ranges splits them).
//
//   g++ -O3 -std=c++17 -fopenmp -Icsrc/include benchmarks/gemv_kernels.cpp -o /tmp/gemv_kernels
//   (or the gemv_kernels target of CMakeLists.txt, whose ctest runs one pass)
//   /tmp/gemv_kernels [passes=8]
//
// Each kernel takes the path this CPU runs (AVX-512, AVX2 or portable; printed first); every
// number is the best of `passes` interleaved passes. Reading them: a GEMV of one x row should be
// bound by memory (compare the GB/s with benchmarks/quant.py's measured read bandwidth); with
// more rows it becomes bound by arithmetic. The int8 / int4 passes include quantizing x (prepare),
// as a decode step does. A second line per case gives each projection's GB/s (q|k|v, o, gate|up,
// down: their shapes stream differently), summed over the passes.
//
// The last lines give each kernel's arithmetic ceiling: one thread, one x row, one weight of each
// shape run again and again while it stays in the caches (pin the process, `taskset -c 1`, or a
// migration between cores reads as a slower kernel). A format whose ceiling sits below the
// per-core read bandwidth stops gaining from faster memory.
#include <idefics3_kit/gemv_bf16.h>
#include <idefics3_kit/gemv_quant.h>
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

using namespace idefics3_kit;

namespace {

constexpr int64_t kHidden = 576, kInter = 1536, kLayers = 30;

struct Weight {
  int64_t n, k;
  std::vector<uint16_t> bf16;
  std::vector<uint8_t> int8, int4;
  std::vector<uint16_t> scales8, scales4;  // int4: groups of 64
};

std::vector<Weight> decoder_weights() {
  const int64_t shapes[4][2] = {{kHidden + 2 * 192, kHidden}, {kHidden, kHidden}, {2 * kInter, kHidden}, {kHidden, kInter}};
  std::mt19937 rng(0);
  std::vector<Weight> out;
  for (int64_t l = 0; l < kLayers; ++l)
    for (const auto& shape : shapes) {
      Weight w{shape[0], shape[1], {}, {}, {}, {}, {}};
      w.bf16.resize(w.n * w.k);
      for (auto& v : w.bf16) v = static_cast<uint16_t>(0x3c00 + (rng() & 0x3ff));
      w.int8.resize(w.n * w.k);
      for (auto& v : w.int8) v = static_cast<uint8_t>(rng() % 255);
      w.int4.resize(w.n * w.k / 2);
      for (auto& v : w.int4) v = static_cast<uint8_t>(rng());
      w.scales8.assign(w.n, 0x3c00);
      w.scales4.assign(w.n * w.k / 64, 0x3c00);
      out.push_back(std::move(w));
    }
  return out;
}

// Rows [r0, r1) of one weight for `rows` x rows: bits 16 (bf16), 8 or 4.
void run(const Weight& w, int bits, const std::vector<uint16_t>& x, int64_t rows, std::vector<uint16_t>& y, int64_t r0,
         int64_t r1) {
  if (bits == 16) {
    const gemv::Job j{x.data(), rows, w.k, w.k, w.bf16.data(), nullptr, y.data(), w.n};
    gemv::run_rows(j, r0, r1);
    return;
  }
  const qgemv::ActSizes n = qgemv::act_sizes(rows, w.k);
  std::vector<int8_t> xq(n.xq), xeo(n.xeo);
  std::vector<float> xs(n.xs), xs8(n.xs8), xs4(n.xs4);
  std::vector<int32_t> init8(n.init8), init4(n.init4);
  qgemv::prepare(x.data(), rows, w.k, w.k, xq.data(), xs.data(), bits == 4 ? xeo.data() : nullptr,
                 bits == 8 ? init8.data() : nullptr, bits == 4 ? init4.data() : nullptr, bits == 8 ? xs8.data() : nullptr,
                 bits == 4 ? xs4.data() : nullptr);
  const qgemv::Act a{rows, w.k, qgemv::padded_k(w.k), xq.data(), xs.data(), xeo.data(),
                     init8.data(), init4.data(), xs8.data(), xs4.data()};
  const qgemv::Job j = bits == 8 ? qgemv::Job{w.int8.data(), 8, 0, w.scales8.data(), nullptr, y.data(), w.n}
                                 : qgemv::Job{w.int4.data(), 4, 64, w.scales4.data(), nullptr, y.data(), w.n};
  qgemv::run_rows(a, j, r0, r1);
}

constexpr int kProjections = 4;  // decoder_weights() lists each layer's q|k|v, o, gate|up, down in turn
const char* const kProjectionNames[kProjections] = {"q|k|v", "o", "gate|up", "down"};

// One pass over the weights; seconds[p] accumulates the time of projection p.
double pass(const std::vector<Weight>& weights, int bits, const std::vector<uint16_t>& x, int64_t rows,
            std::vector<uint16_t>& y, int threads, double* seconds) {
  const auto start = std::chrono::steady_clock::now();
  int64_t index = 0;
  for (const Weight& w : weights) {
    const auto begin = std::chrono::steady_clock::now();
    const int64_t split = (w.n / threads + 3) / 4 * 4;  // a multiple of 4 rows per thread
#pragma omp parallel num_threads(threads)
    {
      const int64_t t = omp_get_thread_num(), r0 = std::min(w.n, t * split);
      const int64_t r1 = t + 1 == threads ? w.n : std::min(w.n, (t + 1) * split);
      if (r0 < r1) run(w, bits, x, rows, y, r0, r1);
    }
    seconds[index++ % kProjections] += std::chrono::duration<double>(std::chrono::steady_clock::now() - begin).count();
  }
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

// One x row against weights[index] (bits 16, 8 or 4), repeated while it stays in the caches: the
// best time per call over `passes` rounds of `calls`.
double hot_call(const Weight& w, int bits, const std::vector<uint16_t>& x, std::vector<uint16_t>& y, int passes) {
  constexpr int calls = 100;
  double best = 1e9;
  for (int p = 0; p < passes + 1; ++p) {  // (the first round warms the caches)
    const auto start = std::chrono::steady_clock::now();
    for (int c = 0; c < calls; ++c) run(w, bits, x, 1, y, 0, w.n);
    if (p > 0) best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() / calls);
  }
  return best;
}

void print_ceilings(const std::vector<Weight>& weights, int passes) {
  std::vector<uint16_t> x(kInter, 0x3f00), y(2 * kInter);
  std::printf("ceilings (one thread, one x row, the weight in the caches), GB/s of weights and weights/ns:\n");
  for (int q = 0; q < kProjections; ++q) {
    const Weight& w = weights[q];
    std::printf("    %-8s [%4ld x %4ld]", kProjectionNames[q], static_cast<long>(w.n), static_cast<long>(w.k));
    for (int bits : {16, 8, 4}) {
      const double seconds = hot_call(w, bits, x, y, passes);
      const double bytes = bits == 16 ? 2.0 * w.n * w.k : bits == 8 ? w.n * w.k + 2.0 * w.n : w.n * w.k / 2.0 + 2.0 * w.scales4.size();
      std::printf("  %s %5.1f GB/s %5.1f w/ns", bits == 16 ? "bf16" : bits == 8 ? "int8" : "int4", bytes / seconds / 1e9,
                  w.n * w.k / seconds / 1e9);
    }
    std::printf("\n");
  }
}

}  // namespace

int main(int argc, char** argv) {
  const int passes = argc > 1 ? std::max(1, std::atoi(argv[1])) : 8;
  std::printf("paths: bf16 %s, int8/int4 %s\n",
              gemv::avx512_path() ? "avx512-bf16" : gemv::avx2_path() ? "avx2" : "portable",
              qgemv::avx512_path() ? "avx512-vnni" : qgemv::avx2_path() ? "avx2" : "portable");
  const std::vector<Weight> weights = decoder_weights();
  double bytes[3] = {0, 0, 0};  // bf16, int8, int4 weights (+ scales)
  double projection_bytes[3][kProjections] = {};
  for (size_t i = 0; i < weights.size(); ++i) {
    const Weight& w = weights[i];
    const double b[3] = {2.0 * w.n * w.k, w.n * w.k + 2.0 * w.n, w.n * w.k / 2.0 + 2.0 * w.scales4.size()};
    for (int f = 0; f < 3; ++f) {
      bytes[f] += b[f];
      projection_bytes[f][i % kProjections] += b[f];
    }
  }
  std::mt19937 rng(1);
  const int formats[3] = {16, 8, 4};
  const char* names[3] = {"bf16", "int8", "int4"};
  for (int threads : {1, 2})
    for (int64_t rows : {1, 2, 4, 8}) {
      std::vector<uint16_t> x(rows * kInter), y(rows * 2 * kInter);
      for (auto& v : x) v = static_cast<uint16_t>(0x3f00 + (rng() & 0xff));
      double best[3] = {1e9, 1e9, 1e9};
      double seconds[3][kProjections] = {};
      for (int p = 0; p < passes; ++p)
        for (int f = 0; f < 3; ++f)
          best[f] = std::min(best[f], pass(weights, formats[f], x, rows, y, threads, seconds[f]));
      std::printf("threads %d  rows %ld ", threads, static_cast<long>(rows));
      for (int f = 0; f < 3; ++f)
        std::printf("  %s %6.2f ms %5.1f GB/s", names[f], best[f] * 1e3, bytes[f] / best[f] / 1e9);
      std::printf("   int8 %.2fx  int4 %.2fx bf16\n", best[0] / best[1], best[0] / best[2]);
      std::printf("    GB/s per projection:");
      for (int f = 0; f < 3; ++f) {
        std::printf("  %s", names[f]);
        for (int q = 0; q < kProjections; ++q)
          std::printf(" %s %.1f", kProjectionNames[q], projection_bytes[f][q] * passes / seconds[f][q] / 1e9);
      }
      std::printf("\n");
    }
  print_ceilings(weights, passes);
  return 0;
}
