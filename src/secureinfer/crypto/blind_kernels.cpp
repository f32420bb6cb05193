// The enclave's side of one blinded product, each step as one pass instead of a dozen small torch ops
// (see blind.py, which also holds the same steps in torch and the reason for these).
//
// Both must give the torch steps' results bit for bit: IEEE float32 division and round-half-to-even for
// the quantization, float64 products in the same order for the rescale. So: no -ffast-math here.
#include <torch/extension.h>

#include <immintrin.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <limits>

namespace {

void check(const torch::Tensor& t, c10::ScalarType dtype, int64_t rows, int64_t cols, const char* name) {
  TORCH_CHECK(t.scalar_type() == dtype && t.dim() == 2 && t.is_contiguous() && t.device().is_cpu(),
              name, " must be a contiguous 2-D CPU tensor of ", c10::toString(dtype));
  TORCH_CHECK(t.size(0) == rows && (cols < 0 || t.size(1) == cols), name, " has shape ", t.sizes(),
              ", expected [", rows, ", ", cols, "]");
}

// The vector paths: AVX512 where the CPU has it (a prefill's ~45M activations a step went through scalar
// division and a libm nearbyint call each, 12 ns an element, ~15% of its time to first token). They do the same
// IEEE operations in the same order as the scalar loops, so their bits are the same (tests run both).
bool has_avx512() {
  static const bool has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
                          __builtin_cpu_supports("avx512vl");
  return has;
}

float row_scale_of(const float* row, int64_t d, float limit) {
  float amax = 0.0f;
  for (int64_t j = 0; j < d; j++) {
    const float magnitude = std::fabs(row[j]);
    amax = (magnitude > amax || std::isnan(magnitude)) ? magnitude : amax;  // NaN wins, as in torch's amax
  }
  const float s = amax / limit;
  return s < FLT_MIN ? FLT_MIN : s;  // clamp(min=tiny); a NaN scale stays NaN
}

void quantize_pad_row(const float* row, const int64_t* r, int64_t d, float s, float limit, int64_t p, int64_t* q,
                      int64_t* padded) {
  for (int64_t j = 0; j < d; j++) {
    const float rounded = std::nearbyint(row[j] / s);
    const int64_t value = static_cast<int64_t>(std::fmin(std::fmax(rounded, -limit), limit));
    q[j] = value;
    const int64_t sum = value + r[j];  // in (-qmax, p + qmax): one correction lands it in [0, p)
    padded[j] = sum < 0 ? sum + p : (sum >= p ? sum - p : sum);
  }
}

#define AVX512 __attribute__((target("avx512f,avx512dq,avx512vl")))

// The lanes of a vector of `width` that hold one of the `left` elements still to do.
inline __mmask16 first_lanes(int64_t left, int64_t width) {
  return left >= width ? static_cast<__mmask16>((1u << width) - 1) : static_cast<__mmask16>((1u << left) - 1);
}

AVX512 float row_scale_avx512(const float* row, int64_t d, float limit) {
  const __m512 magnitude_bits = _mm512_castsi512_ps(_mm512_set1_epi32(0x7fffffff));
  __m512 amax = _mm512_setzero_ps();
  __mmask16 nan = 0;
  for (int64_t j = 0; j < d; j += 16) {
    const __mmask16 lanes = first_lanes(d - j, 16);
    const __m512 magnitude = _mm512_and_ps(_mm512_maskz_loadu_ps(lanes, row + j), magnitude_bits);
    nan |= _mm512_cmp_ps_mask(magnitude, magnitude, _CMP_UNORD_Q);
    amax = _mm512_max_ps(amax, magnitude);
  }
  const float largest = nan ? std::numeric_limits<float>::quiet_NaN() : _mm512_reduce_max_ps(amax);
  const float s = largest / limit;
  return s < FLT_MIN ? FLT_MIN : s;
}

AVX512 void quantize_pad_row_avx512(const float* row, const int64_t* r, int64_t d, float s, float limit, int64_t p,
                                    int64_t* q, int64_t* padded) {
  const __m512 scale = _mm512_set1_ps(s), high = _mm512_set1_ps(limit), low = _mm512_set1_ps(-limit);
  const __m512i modulus = _mm512_set1_epi64(p), zero = _mm512_setzero_si512();
  for (int64_t j = 0; j < d; j += 16) {
    const int64_t left = d - j;
    const __mmask16 lanes = first_lanes(left, 16);
    const __m512 rounded = _mm512_roundscale_ps(_mm512_div_ps(_mm512_maskz_loadu_ps(lanes, row + j), scale),
                                                _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    // max(x, -limit) returns -limit for a NaN x, as fmax does; the value is then an exact integer in range.
    const __m512i values = _mm512_cvtps_epi32(_mm512_min_ps(_mm512_max_ps(rounded, low), high));
    for (int half = 0; half < 2; half++) {
      const int64_t offset = j + 8 * half, count = left - 8 * half;
      if (count <= 0) break;
      const __mmask8 part = first_lanes(count, 8);
      const __m512i value = _mm512_cvtepi32_epi64(half ? _mm512_extracti64x4_epi64(values, 1)
                                                       : _mm512_castsi512_si256(values));
      _mm512_mask_storeu_epi64(q + offset, part, value);
      __m512i sum = _mm512_add_epi64(value, _mm512_maskz_loadu_epi64(part, r + offset));
      sum = _mm512_mask_add_epi64(sum, _mm512_cmplt_epi64_mask(sum, zero), sum, modulus);
      sum = _mm512_mask_sub_epi64(sum, _mm512_cmpge_epi64_mask(sum, modulus), sum, modulus);
      _mm512_mask_storeu_epi64(padded + offset, part, sum);
    }
  }
}

}  // namespace

// x float32 [n, d] -> (q int64 [n, d] in [-qmax, qmax], scale float32 [n], padded = (q + r) mod p int64 [n, d]),
// r int64 [n, d] in [0, p): quant.quantize_activation, then the pad. `vector`: the AVX512 path where the CPU
// has it (tests also run the scalar one).
std::vector<torch::Tensor> quantize_pad(const torch::Tensor& x, const torch::Tensor& r, int64_t qmax, int64_t p,
                                        bool vector) {
  const int64_t n = x.size(0), d = x.size(1);
  check(x, torch::kFloat32, n, d, "x");
  check(r, torch::kInt64, n, d, "r");
  auto q = torch::empty({n, d}, torch::kInt64);
  auto padded = torch::empty({n, d}, torch::kInt64);
  auto scale = torch::empty({n}, torch::kFloat32);
  const float* xs = x.data_ptr<float>();
  const int64_t* rs = r.data_ptr<int64_t>();
  int64_t* qs = q.data_ptr<int64_t>();
  int64_t* ps = padded.data_ptr<int64_t>();
  float* scales = scale.data_ptr<float>();
  const float limit = static_cast<float>(qmax);
  const bool avx512 = vector && has_avx512();
  for (int64_t i = 0; i < n; i++) {
    const int64_t at = i * d;
    if (avx512) {
      scales[i] = row_scale_avx512(xs + at, d, limit);
      quantize_pad_row_avx512(xs + at, rs + at, d, scales[i], limit, p, qs + at, ps + at);
    } else {
      scales[i] = row_scale_of(xs + at, d, limit);
      quantize_pad_row(xs + at, rs + at, d, scales[i], limit, p, qs + at, ps + at);
    }
  }
  return {q, scale, padded};
}

namespace {

float unpad_one(int64_t y, int64_t u, int64_t p, double rs, double cs) {
  const int64_t half = p / 2;
  int64_t residue = (y % p - u + half) % p;  // |each step| < 3p
  residue += residue < 0 ? p : 0;
  return static_cast<float>(static_cast<double>(residue - half) * rs * cs);
}

// An honest device's y lies in [0, p), where one correction each way reduces y - u + p/2; a lane outside it (a
// tampered y) takes the scalar reduction, which handles any int64.
AVX512 void unpad_row_avx512(const int64_t* y, const int64_t* u, int64_t columns, int64_t p, double rs,
                             const double* cs, float* out) {
  const __m512i modulus = _mm512_set1_epi64(p), half = _mm512_set1_epi64(p / 2), zero = _mm512_setzero_si512();
  const __m512d row = _mm512_set1_pd(rs);
  for (int64_t j = 0; j < columns; j += 8) {
    const int64_t left = columns - j;
    const __mmask8 lanes = first_lanes(left, 8);
    const __m512i ys = _mm512_maskz_loadu_epi64(lanes, y + j), us = _mm512_maskz_loadu_epi64(lanes, u + j);
    if ((_mm512_cmpge_epi64_mask(ys, zero) & _mm512_cmplt_epi64_mask(ys, modulus) & lanes) != lanes) {
      for (int64_t k = j; k < j + std::min<int64_t>(8, left); k++) out[k] = unpad_one(y[k], u[k], p, rs, cs[k]);
      continue;
    }
    __m512i residue = _mm512_add_epi64(_mm512_sub_epi64(ys, us), half);
    residue = _mm512_mask_add_epi64(residue, _mm512_cmplt_epi64_mask(residue, zero), residue, modulus);
    residue = _mm512_mask_sub_epi64(residue, _mm512_cmpge_epi64_mask(residue, modulus), residue, modulus);
    const __m512d centred = _mm512_cvtepi64_pd(_mm512_sub_epi64(residue, half));
    const __m512d scaled = _mm512_mul_pd(_mm512_mul_pd(centred, row), _mm512_maskz_loadu_pd(lanes, cs + j));
    _mm256_mask_storeu_ps(out + j, lanes, _mm512_cvtpd_ps(scaled));
  }
}

AVX512 void rescale_row_avx512(const double* own, int64_t columns, double rs, const double* cs, float* out) {
  const __m512d row = _mm512_set1_pd(rs);
  for (int64_t j = 0; j < columns; j += 8) {
    const int64_t left = columns - j;
    const __mmask8 lanes = first_lanes(left, 8);
    const __m512d scaled = _mm512_mul_pd(_mm512_mul_pd(_mm512_maskz_loadu_pd(lanes, own + j), row),
                                         _mm512_maskz_loadu_pd(lanes, cs + j));
    _mm256_mask_storeu_ps(out + j, lanes, _mm512_cvtpd_ps(scaled));
  }
}

}  // namespace

// The device's columns y - u (mod p, centred in (-p/2, p/2)) and the enclave's own columns, rescaled by each
// row's scale and then each column's, as float32 [n, columns + own columns]: field.centred_difference, the join
// and quant.dequantize_product. y comes from the device: any int64 at all is reduced without overflow.
torch::Tensor unpad_rescale(const torch::Tensor& y, const torch::Tensor& u, const torch::Tensor& own,
                            const torch::Tensor& row_scale, const torch::Tensor& column_scale, int64_t p,
                            bool vector) {
  const int64_t n = u.size(0), columns = u.size(1), own_columns = own.size(1);
  check(u, torch::kInt64, n, columns, "u");
  check(y, torch::kInt64, n, columns, "y");
  check(own, torch::kFloat64, n, own_columns, "own");
  TORCH_CHECK(row_scale.scalar_type() == torch::kFloat32 && row_scale.is_contiguous() && row_scale.numel() == n,
              "row_scale must be n contiguous float32 values");
  TORCH_CHECK(column_scale.scalar_type() == torch::kFloat64 && column_scale.is_contiguous() &&
                  column_scale.numel() == columns + own_columns,
              "column_scale must be one contiguous float64 value per output column");
  const int64_t width = columns + own_columns;
  auto out = torch::empty({n, width}, torch::kFloat32);
  const int64_t* ys = y.data_ptr<int64_t>();
  const int64_t* us = u.data_ptr<int64_t>();
  const double* owns = own.data_ptr<double>();
  const double* cs = column_scale.data_ptr<double>();
  float* outs = out.data_ptr<float>();
  const bool avx512 = vector && has_avx512();
  for (int64_t i = 0; i < n; i++) {
    const double rs = static_cast<double>(row_scale.data_ptr<float>()[i]);
    float* row_out = outs + i * width;
    if (avx512) {
      unpad_row_avx512(ys + i * columns, us + i * columns, columns, p, rs, cs, row_out);
      rescale_row_avx512(owns + i * own_columns, own_columns, rs, cs + columns, row_out + columns);
      continue;
    }
    for (int64_t j = 0; j < columns; j++) {
      row_out[j] = unpad_one(ys[i * columns + j], us[i * columns + j], p, rs, cs[j]);
    }
    for (int64_t j = 0; j < own_columns; j++) {
      row_out[columns + j] = static_cast<float>(owns[i * own_columns + j] * rs * cs[columns + j]);
    }
  }
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("quantize_pad", &quantize_pad);
  m.def("unpad_rescale", &unpad_rescale);
  m.def("avx512", &has_avx512);
}
