// Pillow-exact LANCZOS coefficient tables (host side, torch-free, CUDA-free).
//
// A port of the arithmetic of Pillow's src/libImaging/Resample.c (precompute_coeffs +
// normalize_coeffs_8bpc) for the LANCZOS filter with a full box (in0 = 0, in1 = in_size):
// double precision, the same operation order, then int32 with 22 fractional bits (round half
// away from zero). The kernels accumulate pixel * coefficient in int32 from 1 << 21 and clip
// (sum >> 22) to [0, 255], which makes the GPU resize bit-equal to Pillow's.
#pragma once

#include <cmath>
#include <cstdint>
#include <vector>

namespace idefics3_kit {
namespace pillow {

constexpr int kPrecisionBits = 32 - 8 - 2;  // 22
constexpr double kLanczosSupport = 3.0;

inline double sinc_filter(double x) {
  if (x == 0.0) return 1.0;
  x = x * M_PI;
  return std::sin(x) / x;
}

inline double lanczos_filter(double x) {
  // truncated sinc, exactly as Pillow: -3 <= x < 3
  if (-3.0 <= x && x < 3.0) return sinc_filter(x) * sinc_filter(x / 3);
  return 0.0;
}

// One axis: out_size output positions, each with `ksize` int32 coefficients (zero beyond the
// tap count) and bounds (first input index, tap count).
struct AxisCoeffs {
  int in_size = 0;
  int out_size = 0;
  int ksize = 0;
  std::vector<int32_t> coeffs;  // [out_size * ksize]
  std::vector<int32_t> bounds;  // [out_size * 2]: xmin, xcount
};

// Double-precision taps (before quantization), for tests.
inline void precompute_coeffs_double(int in_size, int out_size, std::vector<double>& kk,
                                     std::vector<int32_t>& bounds, int& ksize) {
  const float in0 = 0.0f, in1 = static_cast<float>(in_size);
  double filterscale, scale;
  filterscale = scale = static_cast<double>(in1 - in0) / out_size;
  if (filterscale < 1.0) filterscale = 1.0;
  const double support = kLanczosSupport * filterscale;
  ksize = static_cast<int>(std::ceil(support)) * 2 + 1;
  kk.assign(static_cast<size_t>(out_size) * ksize, 0.0);
  bounds.assign(static_cast<size_t>(out_size) * 2, 0);
  for (int xx = 0; xx < out_size; xx++) {
    const double center = in0 + (xx + 0.5) * scale;
    double ww = 0.0;
    const double ss = 1.0 / filterscale;
    int xmin = static_cast<int>(center - support + 0.5);
    if (xmin < 0) xmin = 0;
    int xmax = static_cast<int>(center + support + 0.5);
    if (xmax > in_size) xmax = in_size;
    xmax -= xmin;
    double* k = &kk[static_cast<size_t>(xx) * ksize];
    for (int x = 0; x < xmax; x++) {
      const double w = lanczos_filter((x + xmin - center + 0.5) * ss);
      k[x] = w;
      ww += w;
    }
    for (int x = 0; x < xmax; x++) {
      if (ww != 0.0) k[x] /= ww;
    }
    bounds[xx * 2 + 0] = xmin;
    bounds[xx * 2 + 1] = xmax;
  }
}

inline AxisCoeffs precompute_coeffs(int in_size, int out_size) {
  AxisCoeffs a;
  a.in_size = in_size;
  a.out_size = out_size;
  std::vector<double> kk;
  precompute_coeffs_double(in_size, out_size, kk, a.bounds, a.ksize);
  a.coeffs.resize(kk.size());
  for (size_t x = 0; x < kk.size(); x++) {
    if (kk[x] < 0) {
      a.coeffs[x] = static_cast<int32_t>(-0.5 + kk[x] * (1 << kPrecisionBits));
    } else {
      a.coeffs[x] = static_cast<int32_t>(0.5 + kk[x] * (1 << kPrecisionBits));
    }
  }
  return a;
}

// Pillow's clip8: lut[ss >> 22] over -640..639, i.e. a clamp to [0, 255].
inline uint8_t clip8(int32_t ss) {
  const int32_t v = ss >> kPrecisionBits;
  return static_cast<uint8_t>(v < 0 ? 0 : (v > 255 ? 255 : v));
}

// Pillow 13 picks the order of the two passes (seen in its ImagingResampleInner): the vertical
// pass runs first when both axes change, the height shrinks, and the rows it removes exceed
// twice the columns the horizontal pass removes; otherwise the horizontal pass runs first
// (then only over the input rows the vertical pass reads). Older Pillow always went
// horizontal first; the two orders differ by a few units on some pixels.
inline bool vertical_first(int in_h, int in_w, int out_h, int out_w) {
  if (in_w == out_w || in_h == out_h) return false;
  const int dy = in_h - out_h;
  return dy > 0 && dy > 2 * (in_w - out_w);
}

namespace detail {
// Horizontal pass over `rows` rows starting at input row `row0`.
inline void pass_h(const uint8_t* src, int w, int c, int row0, int rows, const AxisCoeffs& ch,
                   uint8_t* dst) {
  const int out_w = ch.out_size;
  for (int y = 0; y < rows; y++) {
    for (int xx = 0; xx < out_w; xx++) {
      const int xmin = ch.bounds[xx * 2], xcnt = ch.bounds[xx * 2 + 1];
      const int32_t* k = &ch.coeffs[static_cast<size_t>(xx) * ch.ksize];
      for (int cc = 0; cc < c; cc++) {
        int32_t ss = 1 << (kPrecisionBits - 1);
        for (int x = 0; x < xcnt; x++)
          ss += static_cast<int32_t>(src[(static_cast<size_t>(y + row0) * w + x + xmin) * c + cc]) * k[x];
        dst[(static_cast<size_t>(y) * out_w + xx) * c + cc] = clip8(ss);
      }
    }
  }
}
// Vertical pass; input row index = bounds - row_off.
inline void pass_v(const uint8_t* src, int w, int c, int row_off, const AxisCoeffs& cv, uint8_t* dst) {
  for (int yy = 0; yy < cv.out_size; yy++) {
    const int ymin = cv.bounds[yy * 2] - row_off, ycnt = cv.bounds[yy * 2 + 1];
    const int32_t* k = &cv.coeffs[static_cast<size_t>(yy) * cv.ksize];
    for (int xx = 0; xx < w; xx++) {
      for (int cc = 0; cc < c; cc++) {
        int32_t ss = 1 << (kPrecisionBits - 1);
        for (int y = 0; y < ycnt; y++)
          ss += static_cast<int32_t>(src[(static_cast<size_t>(y + ymin) * w + xx) * c + cc]) * k[y];
        dst[(static_cast<size_t>(yy) * w + xx) * c + cc] = clip8(ss);
      }
    }
  }
}
}  // namespace detail

// Reference CPU resize (uint8 HWC, C channels) with the same arithmetic as the kernels: used
// by the host-only test and available for debugging. Identical size = copy; a pass is skipped
// when its axis is unchanged; uint8 intermediate; pass order as vertical_first().
inline std::vector<uint8_t> resize_reference(const uint8_t* src, int h, int w, int c, int out_h,
                                             int out_w) {
  const size_t n_out = static_cast<size_t>(out_h) * out_w * c;
  if (h == out_h && w == out_w) return std::vector<uint8_t>(src, src + n_out);
  std::vector<uint8_t> out(n_out);
  if (h == out_h) {
    detail::pass_h(src, w, c, 0, h, precompute_coeffs(w, out_w), out.data());
    return out;
  }
  if (w == out_w) {
    detail::pass_v(src, w, c, 0, precompute_coeffs(h, out_h), out.data());
    return out;
  }
  AxisCoeffs ch = precompute_coeffs(w, out_w);
  AxisCoeffs cv = precompute_coeffs(h, out_h);
  std::vector<uint8_t> tmp;
  if (vertical_first(h, w, out_h, out_w)) {
    tmp.resize(static_cast<size_t>(out_h) * w * c);
    detail::pass_v(src, w, c, 0, cv, tmp.data());
    detail::pass_h(tmp.data(), w, c, 0, out_h, ch, out.data());
  } else {
    const int y_first = cv.bounds[0];
    const int y_last = cv.bounds[(out_h - 1) * 2] + cv.bounds[(out_h - 1) * 2 + 1];
    tmp.resize(static_cast<size_t>(y_last - y_first) * out_w * c);
    detail::pass_h(src, w, c, y_first, y_last - y_first, ch, tmp.data());
    detail::pass_v(tmp.data(), out_w, c, y_first, cv, out.data());
  }
  return out;
}

}  // namespace pillow
}  // namespace idefics3_kit
