// The enclave's side of one blinded product, each step as one pass instead of a dozen small torch ops
// (see blind.py, which also holds the same steps in torch and the reason for these).
//
// Both must give the torch steps' results bit for bit: IEEE float32 division and round-half-to-even for
// the quantization, float64 products in the same order for the rescale. So: no -ffast-math here.
#include <torch/extension.h>

#include <cfloat>
#include <cmath>

namespace {

void check(const torch::Tensor& t, c10::ScalarType dtype, int64_t rows, int64_t cols, const char* name) {
  TORCH_CHECK(t.scalar_type() == dtype && t.dim() == 2 && t.is_contiguous() && t.device().is_cpu(),
              name, " must be a contiguous 2-D CPU tensor of ", c10::toString(dtype));
  TORCH_CHECK(t.size(0) == rows && (cols < 0 || t.size(1) == cols), name, " has shape ", t.sizes(),
              ", expected [", rows, ", ", cols, "]");
}

}  // namespace

// x float32 [n, d] -> (q int64 [n, d] in [-qmax, qmax], scale float32 [n], padded = (q + r) mod p int64 [n, d]),
// r int64 [n, d] in [0, p): quant.quantize_activation, then the pad.
std::vector<torch::Tensor> quantize_pad(const torch::Tensor& x, const torch::Tensor& r, int64_t qmax, int64_t p) {
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
  const float limit = static_cast<float>(qmax);
  for (int64_t i = 0; i < n; i++) {
    const float* row = xs + i * d;
    float amax = 0.0f;
    for (int64_t j = 0; j < d; j++) {
      const float magnitude = std::fabs(row[j]);
      amax = (magnitude > amax || std::isnan(magnitude)) ? magnitude : amax;  // NaN wins, as in torch's amax
    }
    float s = amax / limit;
    s = s < FLT_MIN ? FLT_MIN : s;  // clamp(min=tiny); a NaN scale stays NaN
    scale.data_ptr<float>()[i] = s;
    for (int64_t j = 0; j < d; j++) {
      const float rounded = std::nearbyint(row[j] / s);
      const int64_t value = static_cast<int64_t>(std::fmin(std::fmax(rounded, -limit), limit));
      qs[i * d + j] = value;
      const int64_t sum = value + rs[i * d + j];  // in (-qmax, p + qmax): one correction lands it in [0, p)
      ps[i * d + j] = sum < 0 ? sum + p : (sum >= p ? sum - p : sum);
    }
  }
  return {q, scale, padded};
}

// The device's columns y - u (mod p, centred in (-p/2, p/2)) and the enclave's own columns, rescaled by each
// row's scale and then each column's, as float32 [n, columns + own columns]: field.centred_difference, the join
// and quant.dequantize_product. y comes from the device: any int64 at all is reduced without overflow.
torch::Tensor unpad_rescale(const torch::Tensor& y, const torch::Tensor& u, const torch::Tensor& own,
                            const torch::Tensor& row_scale, const torch::Tensor& column_scale, int64_t p) {
  const int64_t n = u.size(0), columns = u.size(1), own_columns = own.size(1);
  check(u, torch::kInt64, n, columns, "u");
  check(y, torch::kInt64, n, columns, "y");
  check(own, torch::kFloat64, n, own_columns, "own");
  TORCH_CHECK(row_scale.scalar_type() == torch::kFloat32 && row_scale.is_contiguous() && row_scale.numel() == n,
              "row_scale must be n contiguous float32 values");
  TORCH_CHECK(column_scale.scalar_type() == torch::kFloat64 && column_scale.is_contiguous() &&
                  column_scale.numel() == columns + own_columns,
              "column_scale must be one contiguous float64 value per output column");
  const int64_t width = columns + own_columns, half = p / 2;
  auto out = torch::empty({n, width}, torch::kFloat32);
  const int64_t* ys = y.data_ptr<int64_t>();
  const int64_t* us = u.data_ptr<int64_t>();
  const double* owns = own.data_ptr<double>();
  const double* cs = column_scale.data_ptr<double>();
  float* outs = out.data_ptr<float>();
  for (int64_t i = 0; i < n; i++) {
    const double rs = static_cast<double>(row_scale.data_ptr<float>()[i]);
    for (int64_t j = 0; j < columns; j++) {
      int64_t residue = (ys[i * columns + j] % p - us[i * columns + j] + half) % p;  // |each step| < 3p
      residue += residue < 0 ? p : 0;
      outs[i * width + j] = static_cast<float>(static_cast<double>(residue - half) * rs * cs[j]);
    }
    for (int64_t j = 0; j < own_columns; j++) {
      outs[i * width + columns + j] = static_cast<float>(owns[i * own_columns + j] * rs * cs[columns + j]);
    }
  }
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("quantize_pad", &quantize_pad);
  m.def("unpad_rescale", &unpad_rescale);
}
