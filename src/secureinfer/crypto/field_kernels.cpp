// field.py's int8 route for a few rows (a decode step) in one call each: cut the limbs, one torch::_int_mm, and
// recombine (see native.py for why). Integers throughout, so the results are field.py's torch steps' exactly.
#include <torch/extension.h>

namespace {

constexpr int64_t kLimbBits = 7;

// values int64 [n, d] -> limbs int8 [count * n, d], limb-major: (v >> 7k) & 127, the top one signed if asked
// (v >> 7(count - 1), kept whole: |v| < 2^16 leaves it in [-4, 3]).
torch::Tensor limbs_of(const torch::Tensor& values, int64_t count, bool signed_top) {
  TORCH_CHECK(values.scalar_type() == torch::kInt64 && values.dim() == 2 && values.is_contiguous() &&
                  values.device().is_cpu(),
              "values must be a contiguous 2-D CPU int64 tensor");
  const int64_t n = values.size(0), d = values.size(1);
  auto limbs = torch::empty({count * n, d}, torch::kInt8);
  const int64_t* vs = values.data_ptr<int64_t>();
  int8_t* ls = limbs.data_ptr<int8_t>();
  for (int64_t k = 0; k < count; k++) {
    const bool whole = signed_top && k == count - 1;
    for (int64_t e = 0; e < n * d; e++) {
      const int64_t shifted = vs[e] >> (kLimbBits * k);
      ls[k * n * d + e] = static_cast<int8_t>(whole ? shifted : (shifted & ((1 << kLimbBits) - 1)));
    }
  }
  return limbs;
}

// sum_k 2^(7k) partial[k] for output e of limb-major int32 partial products ([count * n * out]), Horner-wise:
// |total| <= 2048 * 127 * p < 2^53 for the field route and < 2^16 * 2048 * 127 for the signed one, no overflow.
int64_t recombine(const int32_t* partial, int64_t per_limb, int64_t e, int64_t limb_count) {
  int64_t total = 0;
  for (int64_t k = limb_count - 1; k >= 0; k--) total = total * (1 << kLimbBits) + partial[k * per_limb + e];
  return total;
}

}  // namespace

// (rows @ weight_t) mod p for rows int64 [n, d] in [0, p) and weight_t int8 [d, out] (any layout _int_mm takes).
torch::Tensor field_product(const torch::Tensor& rows, const torch::Tensor& weight_t, int64_t limb_count, int64_t p) {
  const int64_t n = rows.size(0);
  const auto partial = torch::_int_mm(limbs_of(rows, limb_count, false), weight_t);  // int32 [count * n, out]
  const int64_t out_features = partial.size(1);
  auto product = torch::empty({n, out_features}, torch::kInt64);
  const int32_t* ps = partial.data_ptr<int32_t>();
  int64_t* out = product.data_ptr<int64_t>();
  for (int64_t e = 0; e < n * out_features; e++) {
    const int64_t total = recombine(ps, n * out_features, e, limb_count) % p;
    out[e] = total < 0 ? total + p : total;
  }
  return product;
}

// rows @ weight_t as float64, exactly, for rows int64 [n, d] with |v| < 2^16 (three limbs, the top one signed).
torch::Tensor signed_product(const torch::Tensor& rows, const torch::Tensor& weight_t, int64_t limb_count) {
  const int64_t n = rows.size(0);
  const auto partial = torch::_int_mm(limbs_of(rows, limb_count, true), weight_t);
  const int64_t out_features = partial.size(1);
  auto product = torch::empty({n, out_features}, torch::kFloat64);
  const int32_t* ps = partial.data_ptr<int32_t>();
  double* out = product.data_ptr<double>();
  for (int64_t e = 0; e < n * out_features; e++) {
    out[e] = static_cast<double>(recombine(ps, n * out_features, e, limb_count));  // < 2^53: exact as a double
  }
  return product;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("field_product", &field_product);
  m.def("signed_product", &signed_product);
}
