// Host-only driver for csrc/cuda/pillow_coeffs.h (no CUDA, no torch), used by
// tests/cuda/test_host_pillow_coeffs.py and tools/check_cuda.sh.
//   resize_ref_main IN OUT H W C OUT_H OUT_W   (raw uint8 HWC files)
//   resize_ref_main --selftest                   (flat tables vs the shared coefficients)
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#define I3K_NO_CUDA_RUNTIME 1
#include "../../../csrc/cuda/pillow_coeffs.h"
#include "../../../csrc/cuda/preprocess_plan.h"

using namespace idefics3_kit::pillow;

static int selftest() {
  // The flat tables the GPU jobs read must be the shared coefficients, laid out as documented.
  const int sizes[][2] = {{1600, 1456}, {900, 820}, {820, 1092}, {1456, 364}, {1092, 364}, {364, 364},
                          {17, 1456}, {1456, 17}, {1, 5}, {5, 1}, {3, 2}, {4000, 13}};
  int bad = 0;
  for (auto& s : sizes) {
    const AxisCoeffs shared = lanczos_coeffs(s[0], s[1]);
    const FlatCoeffs a = precompute_coeffs(s[0], s[1]);
    if (a.ksize != shared.ksize || a.coeffs.size() != shared.k.size()) bad++;
    for (int xx = 0; xx < s[1]; xx++) {
      const int xmin = a.bounds[xx * 2], cnt = a.bounds[xx * 2 + 1];
      if (xmin != shared.first[xx] || cnt != shared.count[xx]) bad++;
      if (xmin < 0 || cnt < 1 || xmin + cnt > s[0] || cnt > a.ksize) bad++;
      long long sum = 0;
      for (int x = 0; x < a.ksize; x++) {
        const int32_t got = a.coeffs[static_cast<size_t>(xx) * a.ksize + x];
        if (x >= cnt && got != 0) bad++;
        sum += got;
      }
      // normalized taps: the quantized sum is within ksize/2 of 2^22
      if (std::llabs(sum - (1LL << kPrecisionBits)) > a.ksize) bad++;
    }
  }
  std::printf("pillow_coeffs selftest: %s (%d problems)\n", bad ? "FAIL" : "OK", bad);
  return bad ? 1 : 0;
}

int main(int argc, char** argv) {
  if (argc == 2 && std::string(argv[1]) == "--selftest") return selftest();
  // --plan IN OUT H W C OUT_H OUT_W: run the resize_u8 CUDA op's plan with the kernel's code
  const bool use_plan = argc == 9 && std::string(argv[1]) == "--plan";
  if (use_plan) {
    argv++;
    argc--;
  }
  if (argc != 8) {
    std::fprintf(stderr, "usage: %s IN OUT H W C OUT_H OUT_W | --selftest\n", argv[0]);
    return 2;
  }
  const int h = std::atoi(argv[3]), w = std::atoi(argv[4]), c = std::atoi(argv[5]);
  const int oh = std::atoi(argv[6]), ow = std::atoi(argv[7]);
  std::vector<uint8_t> in(static_cast<size_t>(h) * w * c);
  FILE* f = std::fopen(argv[1], "rb");
  if (!f || std::fread(in.data(), 1, in.size(), f) != in.size()) return 3;
  std::fclose(f);
  std::vector<uint8_t> out;
  if (use_plan) {
    idefics3_kit::cuda::SingleResizePlan plan(h, w, c, oh, ow);
    std::vector<uint8_t> tmp(static_cast<size_t>(plan.tmp_bytes) + 1);
    out.resize(static_cast<size_t>(oh) * ow * c);
    if (plan.jobs.empty()) out = in;
    for (size_t k = 0; k < plan.jobs.size(); k++) {
      auto j = plan.jobs[k];
      j.src = plan.src_is_tmp[k] ? tmp.data() : in.data();
      j.dst = plan.dst_is_tmp[k] ? tmp.data() : out.data();
      const int64_t n = idefics3_kit::cuda::resample_job_bytes(j);
      for (int64_t i = 0; i < n; i++) j.dst[i] = idefics3_kit::cuda::resample_byte(j, i, plan.coeffs.data(), plan.bounds.data());
    }
  } else {
    out = resize_reference(in.data(), h, w, c, oh, ow);
  }
  f = std::fopen(argv[2], "wb");
  if (!f || std::fwrite(out.data(), 1, out.size(), f) != out.size()) return 4;
  std::fclose(f);
  return 0;
}
