// freivalds.py's batched check for a few rows in one call: sum over the batch of y s + v (P - W s), which must
// vanish mod P. Each term is a product of two field elements (< 2^70) summed in unsigned 128-bit integers, so
// the sums are exact for any width (below 2^58 terms) and the result equals the numpy float64-limb route's.
// Why: that route is ~20 numpy operations a product, ~100 us in a decode run, 121 times a token.
#include <torch/extension.h>

#include <vector>

namespace {

using Wide = unsigned __int128;

void check_field_rows(const torch::Tensor& t, int64_t rows, int64_t width, const char* what) {
  TORCH_CHECK(t.scalar_type() == torch::kInt64 && t.dim() == 2 && t.is_contiguous() && t.device().is_cpu() &&
                  t.size(0) == rows && t.size(1) == width,
              what, " must be a contiguous CPU int64 [", rows, ", ", width, "] tensor, not ", t.sizes());
}

// Adds row by row  a [rows, n] @ b [n, k]  into sums [rows, k]; false if an element of `a` is outside [0, p).
bool add_product(const torch::Tensor& a, const int64_t* b, int64_t k, int64_t p, std::vector<Wide>& sums) {
  const int64_t rows = a.size(0), n = a.size(1);
  const int64_t* as = a.data_ptr<int64_t>();
  for (int64_t r = 0; r < rows; r++) {
    Wide* row_sums = sums.data() + r * k;
    for (int64_t i = 0; i < n; i++) {
      const int64_t value = as[r * n + i];
      if (value < 0 || value >= p) return false;
      for (int64_t j = 0; j < k; j++) row_sums[j] += static_cast<Wide>(value) * static_cast<uint64_t>(b[i * k + j]);
    }
  }
  return true;
}

}  // namespace

// Whether, for every product (v [rows, in], y [rows, out], stacked [out + in, k] = [s ; P - W s]) of a batch of the
// same rows, the batch's sum of y s + v (P - W s) is 0 mod p in every row and column. A y element outside [0, p)
// fails the batch (the unpadding assumes reduced values); a v outside it is the caller's error.
bool products_vanish(const std::vector<torch::Tensor>& vs, const std::vector<torch::Tensor>& ys,
                     const std::vector<torch::Tensor>& stacked, int64_t p) {
  TORCH_CHECK(vs.size() == ys.size() && vs.size() == stacked.size() && !vs.empty(), "one v, y and stacked per product");
  const int64_t rows = vs[0].size(0), k = stacked[0].size(1);
  std::vector<Wide> sums(rows * k, 0);
  for (size_t m = 0; m < vs.size(); m++) {
    const int64_t in = vs[m].size(1), out = ys[m].size(1);
    check_field_rows(vs[m], rows, in, "v");
    check_field_rows(ys[m], rows, out, "y");
    check_field_rows(stacked[m], out + in, k, "stacked");
    const int64_t* s = stacked[m].data_ptr<int64_t>();
    if (!add_product(ys[m], s, k, p, sums)) return false;
    TORCH_CHECK(add_product(vs[m], s + out * k, k, p, sums), "v must hold field elements in [0, P)");
  }
  for (const Wide sum : sums)
    if (sum % static_cast<Wide>(p) != 0) return false;
  return true;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("products_vanish", &products_vanish); }
