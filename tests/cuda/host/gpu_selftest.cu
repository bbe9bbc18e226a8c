// Standalone GPU self-test of the CUDA kernels (no torch): for validating the kernels on a GPU
// machine before/without building the extension, and for compute-sanitizer on a plain binary.
//
//   nvcc -std=c++17 -O2 -arch=sm_90 -o gpu_selftest tests/cuda/host/gpu_selftest.cu
//        csrc/cuda/preprocess.cu csrc/cuda/attention_fwd*.cu csrc/cuda/attention_decode.cu   (one line)
//   ./gpu_selftest            (exit status 0 = all passed)
//   compute-sanitizer --tool memcheck ./gpu_selftest   (also racecheck, synccheck, initcheck)
//
// Preprocessing: bit-equality with the host reference (pillow_coeffs.h, itself bit-equal to
// Pillow 13 -- tests/cuda/test_host_preprocess_plan.py). Attention: max |err| against a float64
// host reference with the same semantics (GQA, causal offset, key mask, opened rows, seqlens).
// tools/check_cuda.sh compiles and links it (it cannot run it without a GPU).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

#include "../../../csrc/cuda/attention.cuh"
#include "../../../csrc/cuda/pillow_coeffs.h"
#include "../../../csrc/cuda/preprocess_plan.h"

using namespace idefics3_kit;
using namespace idefics3_kit::cuda;

#define CK(x)                                                                                 \
  do {                                                                                        \
    cudaError_t e_ = (x);                                                                     \
    if (e_ != cudaSuccess) {                                                                  \
      std::fprintf(stderr, "CUDA error %s at %s:%d: %s\n", cudaGetErrorString(e_), __FILE__, \
                   __LINE__, #x);                                                             \
      std::exit(2);                                                                           \
    }                                                                                         \
  } while (0)

static int g_fail = 0;
static void report(const char* what, bool ok, double metric = 0.0) {
  std::printf("%-4s %s  (%g)\n", ok ? "OK" : "FAIL", what, metric);
  if (!ok) g_fail++;
}

template <typename T>
static T* to_dev(const std::vector<T>& h) {
  T* d = nullptr;
  CK(cudaMalloc(&d, std::max<size_t>(h.size(), 1) * sizeof(T)));
  if (!h.empty()) CK(cudaMemcpy(d, h.data(), h.size() * sizeof(T), cudaMemcpyHostToDevice));
  return d;
}

// ---------------------------------------------------------------------------------------------
// preprocessing
static void idefics3_geometry(int h, int w, int longest, int tile, int64_t* g /* h1 w1 h2 w2 rows cols */) {
  double ar = static_cast<double>(w) / h;
  int h1, w1;
  if (w >= h) {
    w1 = longest;
    h1 = static_cast<int>(longest / ar);
    if (h1 % 2) h1++;
  } else {
    h1 = longest;
    w1 = static_cast<int>(longest * ar);
    if (w1 % 2) w1++;
  }
  h1 = std::max(h1, 1);
  w1 = std::max(w1, 1);
  ar = static_cast<double>(w1) / h1;
  int h2, w2;
  if (w1 >= h1) {
    w2 = (w1 + tile - 1) / tile * tile;
    h2 = static_cast<int>(w2 / ar);
    h2 = (h2 + tile - 1) / tile * tile;
  } else {
    h2 = (h1 + tile - 1) / tile * tile;
    w2 = static_cast<int>(h2 * ar);
    w2 = (w2 + tile - 1) / tile * tile;
  }
  g[0] = h1; g[1] = w1;
  if (h2 > tile || w2 > tile) {
    g[2] = h2; g[3] = w2; g[4] = h2 / tile; g[5] = w2 / tile;
  } else {
    g[2] = tile; g[3] = tile; g[4] = 0; g[5] = 0;
  }
}

static void test_preprocess(int longest, int tile, std::mt19937& rng) {
  const int sizes[][2] = {{900, 1600}, {45, 80}, {300, 7}, {1, 1}, {tile, tile}, {113, 112}, {longest, longest}};
  const int n = sizeof(sizes) / sizeof(sizes[0]);
  std::vector<ImageGeometry> geo;
  std::vector<std::vector<uint8_t>> imgs;
  int64_t T = 1;
  for (int i = 0; i < n; i++) {
    ImageGeometry g{};
    g.in_h = sizes[i][0];
    g.in_w = sizes[i][1];
    int64_t gg[6];
    idefics3_geometry(sizes[i][0], sizes[i][1], longest, tile, gg);
    g.h1 = gg[0]; g.w1 = gg[1]; g.h2 = gg[2]; g.w2 = gg[3]; g.rows = gg[4]; g.cols = gg[5];
    g.sample = i;  // one image per sample
    g.first_tile = 0;
    T = std::max<int64_t>(T, g.rows * g.cols > 0 ? g.rows * g.cols + 1 : 1);
    geo.push_back(g);
    std::vector<uint8_t> im(static_cast<size_t>(g.in_h * g.in_w * 3));
    for (auto& x : im) x = static_cast<uint8_t>(rng() & 255);
    imgs.push_back(std::move(im));
  }
  const double mean[3] = {0.5, 0.5, 0.5}, stdv[3] = {0.5, 0.5, 0.5};
  float lut[768];
  normalize_lut(mean, stdv, 1.0 / 255.0, lut);
  // device run
  std::vector<uint8_t*> d_imgs;
  std::vector<const uint8_t*> inputs;
  for (auto& im : imgs) {
    d_imgs.push_back(to_dev(im));
    inputs.push_back(d_imgs.back());
  }
  PreprocessPlan plan(geo, tile, T);
  uint8_t* ws = nullptr;
  CK(cudaMalloc(&ws, std::max<int64_t>(plan.workspace_bytes(), 1)));
  plan.build(inputs, ws, nullptr, lut);
  uint8_t* blob = to_dev(plan.blob());
  plan.set_blob_device(blob);
  const int64_t plane = static_cast<int64_t>(tile) * tile;
  const size_t nv = static_cast<size_t>(n * T * 3 * plane), nm = static_cast<size_t>(n * T * plane);
  float* d_v = nullptr;
  int64_t* d_m = nullptr;
  CK(cudaMalloc(&d_v, nv * sizeof(float)));
  CK(cudaMalloc(&d_m, nm * sizeof(int64_t)));
  CK(cudaMemset(d_v, 0xFF, nv * sizeof(float)));  // NaN poison: every real tile must be written
  CK(cudaMemset(d_m, 0, nm * sizeof(int64_t)));
  cudaStream_t st;
  CK(cudaStreamCreate(&st));
  for (const auto& l : plan.resample_launches())
    CK(launch_resample(plan.jobs_dev(l), l.njobs, l.blocks, plan.coeffs_dev(), plan.bounds_dev(), st));
  CK(launch_emit(plan.emit_dev(), plan.emit_jobs(), plan.emit_blocks(), tile, plan.lut_dev(), d_v,
                 OutDType::kFloat32, d_m, 8, 1, st));
  CK(cudaStreamSynchronize(st));
  std::vector<float> v(nv);
  std::vector<int64_t> m(nm);
  CK(cudaMemcpy(v.data(), d_v, nv * sizeof(float), cudaMemcpyDeviceToHost));
  CK(cudaMemcpy(m.data(), d_m, nm * sizeof(int64_t), cudaMemcpyDeviceToHost));
  // host reference
  int64_t bad = 0;
  for (int i = 0; i < n; i++) {
    const auto& g = geo[i];
    auto s1 = pillow::resize_reference(imgs[i].data(), (int)g.in_h, (int)g.in_w, 3, (int)g.h1, (int)g.w1);
    auto s2 = pillow::resize_reference(s1.data(), (int)g.h1, (int)g.w1, 3, (int)g.h2, (int)g.w2);
    std::vector<std::vector<uint8_t>> tiles;
    for (int64_t r = 0; r < g.rows; r++)
      for (int64_t c = 0; c < g.cols; c++) {
        std::vector<uint8_t> t(static_cast<size_t>(plane * 3));
        for (int y = 0; y < tile; y++)
          std::memcpy(&t[static_cast<size_t>(y) * tile * 3], &s2[((r * tile + y) * g.w2 + c * tile) * 3],
                      static_cast<size_t>(tile) * 3);
        tiles.push_back(t);
      }
    tiles.push_back(g.rows * g.cols > 0 ? pillow::resize_reference(s2.data(), (int)g.h2, (int)g.w2, 3, tile, tile) : s2);
    for (int64_t j = 0; j < T; j++) {
      for (int64_t p = 0; p < plane; p++) {
        const int64_t mi = (i * T + j) * plane + p;
        const bool real = j < static_cast<int64_t>(tiles.size());
        if (m[mi] != (real ? 1 : 0)) bad++;
        for (int c = 0; c < 3; c++) {
          const float got = v[static_cast<size_t>(((i * T + j) * 3 + c) * plane + p)];
          if (real) {
            const float want = lut[c * 256 + tiles[j][p * 3 + c]];
            if (std::memcmp(&got, &want, 4) != 0) bad++;
          } else if (!std::isnan(got)) {
            bad++;  // padding tiles must be left alone
          }
        }
      }
    }
  }
  char name[128];
  std::snprintf(name, sizeof name, "preprocess bit-exact, geometry %d/%d, %d images (mismatches)", longest, tile, n);
  report(name, bad == 0, static_cast<double>(bad));
  for (auto* p : d_imgs) CK(cudaFree(p));
  CK(cudaFree(ws));
  CK(cudaFree(blob));
  CK(cudaFree(d_v));
  CK(cudaFree(d_m));
  CK(cudaStreamDestroy(st));
}

// ---------------------------------------------------------------------------------------------
// attention
static float bf16_to_float(uint16_t b) {
  uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
static uint16_t float_to_bf16(float f) { return float_to_bf16_bits(f); }

// float64 reference: q [B,Hq,Lq,D], k/v [B,Hkv,Lk,D] contiguous (bf16 values as float)
static void ref_attention(const std::vector<float>& q, const std::vector<float>& k, const std::vector<float>& v,
                          const std::vector<uint8_t>* mask, const std::vector<int32_t>* seqlens, int B, int Hq,
                          int Hkv, int Lq, int Lk, int D, bool causal, double scale, std::vector<double>& out) {
  out.assign(static_cast<size_t>(B) * Hq * Lq * D, 0.0);
  for (int b = 0; b < B; b++) {
    const int len = seqlens ? std::min(Lk, (*seqlens)[b]) : Lk;
    for (int h = 0; h < Hq; h++) {
      const int hk = h / (Hq / Hkv);
      for (int i = 0; i < Lq; i++) {
        const int pos = len - Lq + i;
        std::vector<char> allow(static_cast<size_t>(len));
        bool any = false;
        for (int j = 0; j < len; j++) {
          allow[j] = (!causal || j <= pos) && (!mask || (*mask)[static_cast<size_t>(b) * Lk + j]);
          any |= allow[j] != 0;
        }
        if (!any) std::fill(allow.begin(), allow.end(), 1);
        std::vector<double> s(static_cast<size_t>(len));
        double mx = -INFINITY;
        for (int j = 0; j < len; j++) {
          if (!allow[j]) continue;
          double acc = 0;
          for (int d = 0; d < D; d++)
            acc += static_cast<double>(q[((static_cast<size_t>(b) * Hq + h) * Lq + i) * D + d]) *
                   k[((static_cast<size_t>(b) * Hkv + hk) * Lk + j) * D + d];
          s[j] = acc * scale;
          mx = std::max(mx, s[j]);
        }
        double den = 0;
        for (int j = 0; j < len; j++) den += allow[j] ? std::exp(s[j] - mx) : 0.0;
        for (int j = 0; j < len; j++) {
          if (!allow[j]) continue;
          const double p = std::exp(s[j] - mx) / den;
          for (int d = 0; d < D; d++)
            out[((static_cast<size_t>(b) * Hq + h) * Lq + i) * D + d] +=
                p * v[((static_cast<size_t>(b) * Hkv + hk) * Lk + j) * D + d];
        }
      }
    }
  }
}

static void rand_bf16(std::vector<uint16_t>& h, std::vector<float>& f, size_t n, std::mt19937& rng) {
  std::normal_distribution<float> nd(0.f, 1.f);
  h.resize(n);
  f.resize(n);
  for (size_t i = 0; i < n; i++) {
    h[i] = float_to_bf16(nd(rng));
    f[i] = bf16_to_float(h[i]);
  }
}

static void test_fwd(int B, int Hq, int Hkv, int Lq, int Lk, int D, bool causal, int mask_kind, std::mt19937& rng) {
  std::vector<uint16_t> hq, hk, hv;
  std::vector<float> fq, fk, fv;
  rand_bf16(hq, fq, static_cast<size_t>(B) * Hq * Lq * D, rng);
  rand_bf16(hk, fk, static_cast<size_t>(B) * Hkv * Lk * D, rng);
  rand_bf16(hv, fv, static_cast<size_t>(B) * Hkv * Lk * D, rng);
  std::vector<uint8_t> mask(static_cast<size_t>(B) * Lk, 1);
  if (mask_kind == 1) {  // padding (left for causal, right otherwise), row 0 fully masked
    for (int b = 0; b < B; b++) {
      const int cut = static_cast<int>(rng() % (Lk + 1));
      for (int j = 0; j < Lk; j++) mask[static_cast<size_t>(b) * Lk + j] = causal ? (j >= cut) : (j < cut);
    }
    for (int j = 0; j < Lk; j++) mask[j] = 0;
  }
  const double scale = 1.0 / std::sqrt(static_cast<double>(D));
  std::vector<double> ref;
  ref_attention(fq, fk, fv, mask_kind ? &mask : nullptr, nullptr, B, Hq, Hkv, Lq, Lk, D, causal, scale, ref);
  uint16_t *dq = to_dev(hq), *dk = to_dev(hk), *dv = to_dev(hv), *dout = nullptr;
  uint8_t* dm = to_dev(mask);
  CK(cudaMalloc(&dout, ref.size() * 2));
  AttnFwdParams p{};
  p.q = dq; p.k = dk; p.v = dv; p.o = dout;
  p.key_mask = mask_kind ? dm : nullptr;
  p.q_sb = static_cast<int64_t>(Hq) * Lq * D; p.q_sh = static_cast<int64_t>(Lq) * D; p.q_sl = D;
  p.k_sb = static_cast<int64_t>(Hkv) * Lk * D; p.k_sh = static_cast<int64_t>(Lk) * D; p.k_sl = D;
  p.v_sb = p.k_sb; p.v_sh = p.k_sh; p.v_sl = D;
  p.o_sb = p.q_sb; p.o_sh = p.q_sh; p.o_sl = D;
  p.mask_sb = Lk;
  p.B = B; p.Hq = Hq; p.Hkv = Hkv; p.Lq = Lq; p.Lk = Lk; p.D = D;
  p.scale_log2 = static_cast<float>(scale * 1.4426950408889634);
  p.causal = causal;
  CK(launch_attention_fwd(p, AttnDType::kBFloat16, nullptr));
  CK(cudaDeviceSynchronize());
  std::vector<uint16_t> out(ref.size());
  CK(cudaMemcpy(out.data(), dout, out.size() * 2, cudaMemcpyDeviceToHost));
  double err = 0;
  for (size_t i = 0; i < out.size(); i++) {
    const double e = std::fabs(bf16_to_float(out[i]) - ref[i]);
    err = std::isnan(e) ? INFINITY : std::max(err, e);
  }
  char name[160];
  std::snprintf(name, sizeof name, "attention fwd B%d H%d/%d Lq%d Lk%d D%d %s mask%d (max abs err)", B, Hq, Hkv, Lq,
                Lk, D, causal ? "causal" : "full", mask_kind);
  report(name, err < 2e-2, err);
  CK(cudaFree(dq)); CK(cudaFree(dk)); CK(cudaFree(dv)); CK(cudaFree(dout)); CK(cudaFree(dm));
}

static void test_decode(int B, int Hq, int Hkv, int Lk, int D, int splits, bool use_mask, bool use_seqlens,
                        std::mt19937& rng) {
  std::vector<uint16_t> hq, hk, hv;
  std::vector<float> fq, fk, fv;
  rand_bf16(hq, fq, static_cast<size_t>(B) * Hq * D, rng);
  rand_bf16(hk, fk, static_cast<size_t>(B) * Hkv * Lk * D, rng);
  rand_bf16(hv, fv, static_cast<size_t>(B) * Hkv * Lk * D, rng);
  std::vector<uint8_t> mask(static_cast<size_t>(B) * Lk, 1);
  if (use_mask) {
    for (auto& x : mask) x = (rng() % 10) < 7;
    for (int j = 0; j < Lk; j++) mask[j] = 0;  // row 0 opened
  }
  std::vector<int32_t> seqlens(static_cast<size_t>(B), Lk);
  if (use_seqlens)
    for (auto& s : seqlens) s = 1 + static_cast<int32_t>(rng() % Lk);
  const double scale = 1.0 / std::sqrt(static_cast<double>(D));
  std::vector<double> ref;
  // the reference slices each row's cache to its length, so its key mask is sliced the same way
  ref_attention(fq, fk, fv, use_mask ? &mask : nullptr, use_seqlens ? &seqlens : nullptr, B, Hq, Hkv, 1, Lk, D,
                false, scale, ref);
  uint16_t *dq = to_dev(hq), *dk = to_dev(hk), *dv = to_dev(hv), *dout = nullptr;
  uint8_t* dm = to_dev(mask);
  int32_t* ds = to_dev(seqlens);
  float *po = nullptr, *pl = nullptr;
  CK(cudaMalloc(&dout, ref.size() * 2));
  CK(cudaMalloc(&po, static_cast<size_t>(B) * Hq * splits * D * 4));
  CK(cudaMalloc(&pl, static_cast<size_t>(B) * Hq * splits * 4));
  AttnDecodeParams p{};
  p.q = dq; p.k = dk; p.v = dv; p.o = dout;
  p.key_mask = use_mask ? dm : nullptr;
  p.cache_seqlens = use_seqlens ? ds : nullptr;
  p.partial_o = po; p.partial_lse = pl;
  p.q_sb = static_cast<int64_t>(Hq) * D; p.q_sh = D;
  p.k_sb = static_cast<int64_t>(Hkv) * Lk * D; p.k_sh = static_cast<int64_t>(Lk) * D; p.k_sl = D;
  p.v_sb = p.k_sb; p.v_sh = p.k_sh; p.v_sl = D;
  p.o_sb = p.q_sb; p.o_sh = D;
  p.mask_sb = Lk;
  p.B = B; p.Hq = Hq; p.Hkv = Hkv; p.Lk = Lk; p.D = D;
  p.num_splits = splits;
  p.scale_log2 = static_cast<float>(scale * 1.4426950408889634);
  CK(launch_attention_decode(p, AttnDType::kBFloat16, nullptr));
  CK(cudaDeviceSynchronize());
  std::vector<uint16_t> out(ref.size());
  CK(cudaMemcpy(out.data(), dout, out.size() * 2, cudaMemcpyDeviceToHost));
  double err = 0;
  for (size_t i = 0; i < out.size(); i++) {
    const double e = std::fabs(bf16_to_float(out[i]) - ref[i]);
    err = std::isnan(e) ? INFINITY : std::max(err, e);
  }
  char name[160];
  std::snprintf(name, sizeof name, "attention decode B%d H%d/%d Lk%d D%d splits%d mask%d seqlens%d (max abs err)", B,
                Hq, Hkv, Lk, D, splits, use_mask, use_seqlens);
  report(name, err < 2e-2, err);
  CK(cudaFree(dq)); CK(cudaFree(dk)); CK(cudaFree(dv)); CK(cudaFree(dout)); CK(cudaFree(dm));
  CK(cudaFree(ds)); CK(cudaFree(po)); CK(cudaFree(pl));
}

int main() {
  int dev_count = 0;
  if (cudaGetDeviceCount(&dev_count) != cudaSuccess || dev_count == 0) {
    std::printf("gpu_selftest: no CUDA device\n");
    return 77;  // "skipped"
  }
  std::mt19937 rng(1234);
  test_preprocess(112, 28, rng);
  test_preprocess(1456, 364, rng);
  for (int D : {64, 72, 128}) {
    for (int mk : {0, 1}) {
      test_fwd(2, 4, 2, 130, 130, D, false, mk, rng);
      test_fwd(1, 2, 2, 1, 1, D, false, mk, rng);
      if (D != 72) {
        test_fwd(2, 8, 2, 200, 200, D, true, mk, rng);
        test_fwd(2, 4, 1, 37, 300, D, true, mk, rng);
      }
    }
  }
  for (int D : {64, 128})
    for (int splits : {1, 4})
      for (int variant = 0; variant < 3; variant++)
        test_decode(3, 32, 8, 1000, D, splits, variant == 1, variant == 2, rng);
  test_decode(2, 6, 2, 37, 128, 2, false, false, rng);
  test_decode(1, 16, 1, 4096, 128, 16, true, true, rng);
  std::printf("gpu_selftest: %s (%d failed)\n", g_fail ? "FAILED" : "PASSED", g_fail);
  return g_fail ? 1 : 0;
}
