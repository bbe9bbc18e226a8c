// Host-only driver for the GPU preprocessing plan (csrc/cuda/preprocess_plan.h): builds the
// plan exactly as the CUDA binding does, then runs every job with the same per-element
// functions the kernels run (resample_byte, the LUT gather, float_to_bf16_bits), in launch
// order, on host memory. tests/cuda/test_host_preprocess_plan.py compares the result with the
// Pillow reference op, so the plan logic (pass order, skipped passes, aliasing, workspace
// offsets, tiles) is checked without a GPU.
//
//   preprocess_plan_main SPEC LUT OUT_VALUES OUT_MASK
// SPEC: "S T B bf16" then one line per image: "in_h in_w sample first h1 w1 h2 w2 rows cols PATH"
#include <cstdio>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#define I3K_NO_CUDA_RUNTIME 1
#include "../../../csrc/cuda/preprocess_plan.h"

using namespace idefics3_kit::cuda;

int main(int argc, char** argv) {
  if (argc != 5) {
    std::fprintf(stderr, "usage: %s SPEC LUT OUT_VALUES OUT_MASK\n", argv[0]);
    return 2;
  }
  std::ifstream spec(argv[1]);
  int64_t S, T, B;
  int bf16;
  spec >> S >> T >> B >> bf16;
  std::vector<ImageGeometry> geo;
  std::vector<std::vector<uint8_t>> images;
  ImageGeometry g;
  std::string path;
  while (spec >> g.in_h >> g.in_w >> g.sample >> g.first_tile >> g.h1 >> g.w1 >> g.h2 >> g.w2 >> g.rows >> g.cols >> path) {
    std::vector<uint8_t> im(static_cast<size_t>(g.in_h * g.in_w * 3));
    std::ifstream f(path, std::ios::binary);
    f.read(reinterpret_cast<char*>(im.data()), static_cast<std::streamsize>(im.size()));
    if (!f) return 3;
    geo.push_back(g);
    images.push_back(std::move(im));
  }
  std::vector<float> lut(3 * 256);
  {
    std::ifstream f(argv[2], std::ios::binary);
    f.read(reinterpret_cast<char*>(lut.data()), static_cast<std::streamsize>(lut.size() * sizeof(float)));
    if (!f) return 4;
  }
  {  // the binding's LUT (C++) must equal the Python normalize_lut bit for bit
    const double mean[3] = {0.5, 0.5, 0.5}, stdv[3] = {0.5, 0.5, 0.5};
    std::vector<float> mine(3 * 256);
    normalize_lut(mean, stdv, 1.0 / 255.0, mine.data());
    if (std::memcmp(mine.data(), lut.data(), mine.size() * sizeof(float)) != 0) return 6;
  }
  PreprocessPlan plan(geo, S, T);
  std::vector<uint8_t> ws(static_cast<size_t>(plan.workspace_bytes()) + 1, 0xCD);  // poisoned
  std::vector<const uint8_t*> inputs;
  for (auto& im : images) inputs.push_back(im.data());
  plan.build(inputs, ws.data(), nullptr, lut.data());

  // Run every launch as the GPU would: each (block, thread) of the grid, through the kernels'
  // own index functions (find_job, resample_index, emit_pixel). Jobs of one launch are
  // independent, launches run in order.
  for (const auto& l : plan.resample_launches()) {
    const ResampleJob* jobs = plan.jobs_host(l);
    int64_t expect = 0;
    for (int j = 0; j < l.njobs; j++) {
      if (jobs[j].block_start != expect) return 5;  // prefix sums consistent
      expect += (resample_job_bytes(jobs[j]) + kResampleThreads - 1) / kResampleThreads;
    }
    if (expect != l.blocks) return 5;
    for (int blk = 0; blk < l.blocks; blk++) {
      for (int tid = 0; tid < kResampleThreads; tid++) {
        int job;
        const int64_t i = resample_index(jobs, l.njobs, blk, tid, &job);
        if (i >= 0) jobs[job].dst[i] = resample_byte(jobs[job], i, plan.coeffs_host(), plan.bounds_host());
      }
    }
  }
  const int64_t plane = S * S;
  std::vector<float> values(static_cast<size_t>(B * T * 3 * plane), 0.0f);
  std::vector<uint16_t> values16(values.size(), 0);
  std::vector<uint8_t> mask(static_cast<size_t>(B * T * plane), 0);
  const EmitJob* ej = plan.emit_host();
  for (int blk = 0; blk < plan.emit_blocks(); blk++) {
    for (int tid = 0; tid < kEmitThreads; tid++) {
      int job;
      const int64_t p = emit_pixel(ej, plan.emit_jobs(), blk, tid, static_cast<int>(S), &job);
      if (p < 0) continue;
      const int64_t y = p / S, x = p % S;
      const uint8_t* s = ej[job].src + (y * ej[job].src_w + x) * 3;
      for (int c = 0; c < 3; c++) {
        const float v = plan.lut_host()[c * 256 + s[c]];
        const int64_t idx = ej[job].out_tile * 3 * plane + c * plane + p;
        values[idx] = v;
        values16[idx] = float_to_bf16_bits(v);
      }
      mask[ej[job].out_tile * plane + p] = 1;
    }
  }
  {
    std::ofstream f(argv[3], std::ios::binary);
    if (bf16)
      f.write(reinterpret_cast<const char*>(values16.data()), static_cast<std::streamsize>(values16.size() * 2));
    else
      f.write(reinterpret_cast<const char*>(values.data()), static_cast<std::streamsize>(values.size() * 4));
  }
  {
    std::ofstream f(argv[4], std::ios::binary);
    f.write(reinterpret_cast<const char*>(mask.data()), static_cast<std::streamsize>(mask.size()));
  }
  return 0;
}
