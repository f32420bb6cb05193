// field.py's int8 route for a few rows (a decode step) in one call each: cut the limbs, multiply, and recombine
// (see native.py for why). Integers throughout, so the results are field.py's torch steps' exactly.
//
// The multiply is torch::_int_mm in general. For one or two rows, one thread and a weight laid out [out, in] (as
// `product_weight` keeps it) on a CPU with AVX512-VNNI it is our own loop over vpdpbusd instead: the weight is
// read once, in order, and nothing is repacked, allocated or dispatched per call. In a decode run, where every
// weight comes from far caches, this measured 2-2.5x faster than _int_mm for this model's layer shapes
// (576 x 240 ... 1536 x 288 columns).
#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <vector>

namespace {

constexpr int64_t kLimbBits = 7;
constexpr int64_t kLimbMask = (1 << kLimbBits) - 1;
constexpr int64_t kMaxLimbs = 5;  // the field route's; the signed one uses 3 plus a row of ones
constexpr int64_t kColumnsPerPass = 4;  // outputs whose weight rows share each load of the limbs
constexpr int64_t kLane = 64;  // int8 elements per 512-bit register
// Weight rows are fetched this many passes ahead: the hardware alone kept ~5.7 GB/s of ~10.5 out of memory; 2
// ahead took this model's layer weights, cycling through 30 layers, from 35-185 to 16-73 us (the next best of
// 0/2/4/8/16), and from cold caches 81-240 to 68-155 us.
constexpr int64_t kPrefetchPasses = 2;
// Rows up to which our loop beats _int_mm: it re-reads each weight row per limb row, where _int_mm blocks rows
// (one layer's weights cycling, one thread: 1 row 14-42 against 34-88 us, 2 rows about even, 4 rows 1.4-1.8x slower).
// It runs on one thread, so only where torch has one (each side of a blinded scheme): `plain-int8`'s device, on
// every core, decoded at 24 against 29 tok/s with it.
constexpr int64_t kMaxDotRows = 2;
// The signed route's offset: v + 2^16 is unsigned for |v| < 2^16, and below 2^17 it fits three 7-bit limbs.
constexpr int64_t kSignedOffset = 1 << 16;

void check_rows(const torch::Tensor& values) {
  TORCH_CHECK(values.scalar_type() == torch::kInt64 && values.dim() == 2 && values.is_contiguous() &&
                  values.device().is_cpu(),
              "values must be a contiguous 2-D CPU int64 tensor");
}

// sum_k 2^(7k) partial[k] for output e of limb-major int32 partial products ([count * n * out]), Horner-wise:
// |total| <= 2048 * 127 * p < 2^53 for the field route and < 2^17 * 2048 * 127 for the signed one (limbs of
// v + 2^16), no overflow.
int64_t recombine(const int32_t* partial, int64_t per_limb, int64_t e, int64_t limb_count) {
  int64_t total = 0;
  for (int64_t k = limb_count - 1; k >= 0; k--) total = total * (1 << kLimbBits) + partial[k * per_limb + e];
  return total;
}

bool has_dot_product_instructions() {
  static const bool has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vnni");
  return has;
}

// The weight's memory as rows of `d` int8s, one per output, when weight_t [d, out] is such a transposed view.
const int8_t* rows_by_output(const torch::Tensor& weight_t, int64_t d) {
  const bool by_output = weight_t.scalar_type() == torch::kInt8 && weight_t.device().is_cpu() &&
                         weight_t.dim() == 2 && weight_t.size(0) == d && weight_t.stride(0) == 1 &&
                         (weight_t.stride(1) == d || weight_t.size(1) == 1);
  return by_output ? weight_t.data_ptr<int8_t>() : nullptr;
}

// partial[(k * n + r) * out + j] = sum_i limbs[(k * n + r) * stride + i] * weight[j * d + i], for the limb rows
// [count * n, stride] (unsigned, below 2^7, zero past d) and weight rows [out, d]. vpdpbusd sums u8 x s8 products
// four at a time into int32 lanes without saturating; every sum stays below 2048 * 127 * 127 < 2^31, so it is
// exact, and in any order. Each weight row is loaded once per pass, for all limb rows.
__attribute__((target("avx512f,avx512bw,avx512vnni"))) void dot_limb_rows(
    const uint8_t* limbs, int64_t limb_rows, int64_t stride, const int8_t* weight, int64_t d, int64_t out_features,
    int32_t* partial) {
  const int64_t lanes = stride / kLane;
  const __mmask64 last = d % kLane ? (__mmask64{1} << (d % kLane)) - 1 : ~__mmask64{0};
  for (int64_t j = 0; j < out_features; j += kColumnsPerPass) {
    const int64_t columns = std::min(kColumnsPerPass, out_features - j);
    for (int64_t first = 0; first < limb_rows; first += kMaxLimbs) {
      const int64_t rows = std::min(kMaxLimbs, limb_rows - first);
      __m512i sums[kMaxLimbs][kColumnsPerPass];
      for (int64_t k = 0; k < kMaxLimbs; k++)
        for (int64_t c = 0; c < kColumnsPerPass; c++) sums[k][c] = _mm512_setzero_si512();
      for (int64_t lane = 0; lane < lanes; lane++) {
        const __mmask64 mask = lane == lanes - 1 ? last : ~__mmask64{0};
        if (j + kPrefetchPasses * kColumnsPerPass < out_features)
          for (int64_t c = 0; c < kColumnsPerPass; c++)
            _mm_prefetch(reinterpret_cast<const char*>(weight + (j + kPrefetchPasses * kColumnsPerPass + c) * d + lane * kLane),
                         _MM_HINT_T0);
        __m512i w[kColumnsPerPass];
        for (int64_t c = 0; c < kColumnsPerPass; c++)
          w[c] = c < columns ? _mm512_maskz_loadu_epi8(mask, weight + (j + c) * d + lane * kLane) : _mm512_setzero_si512();
        for (int64_t k = 0; k < rows; k++) {
          const __m512i limb = _mm512_loadu_si512(limbs + (first + k) * stride + lane * kLane);
          for (int64_t c = 0; c < kColumnsPerPass; c++) sums[k][c] = _mm512_dpbusd_epi32(sums[k][c], limb, w[c]);
        }
      }
      for (int64_t k = 0; k < rows; k++)
        for (int64_t c = 0; c < columns; c++) partial[(first + k) * out_features + j + c] = _mm512_reduce_add_epi32(sums[k][c]);
    }
  }
}

// values int64 [n, d] -> unsigned limbs ((v + offset) >> 7k) & 127 into limbs [count * n + extra, stride],
// limb-major, then `extra` rows of ones; the caller zeroes what lies past d.
void cut_limbs(const int64_t* vs, int64_t n, int64_t d, int64_t count, int64_t offset, int64_t extra, int64_t stride,
               uint8_t* limbs) {
  for (int64_t k = 0; k < count; k++)
    for (int64_t r = 0; r < n; r++)
      for (int64_t i = 0; i < d; i++) limbs[(k * n + r) * stride + i] = ((vs[r * d + i] + offset) >> (kLimbBits * k)) & kLimbMask;
  for (int64_t row = count * n; row < count * n + extra; row++) std::fill_n(limbs + row * stride, d, uint8_t{1});
}

// The limbs' int32 partial products with the weight ([count * n + extra, out], limb-major), by whichever multiply
// applies (see the top of the file); `extra` appends rows of ones, whose products are the weight's column sums.
std::vector<int32_t> partial_products(const torch::Tensor& rows, const torch::Tensor& weight_t, int64_t count,
                                      int64_t offset, int64_t extra) {
  check_rows(rows);
  const int64_t n = rows.size(0), d = rows.size(1), out_features = weight_t.size(1);
  TORCH_CHECK(weight_t.size(0) == d, "weight_t must be [", d, ", out], not ", weight_t.sizes());
  const int64_t* vs = rows.data_ptr<int64_t>();
  std::vector<int32_t> partial((count * n + extra) * out_features);
  const bool ours = n <= kMaxDotRows && at::get_num_threads() == 1 && has_dot_product_instructions();
  const int8_t* weight = ours ? rows_by_output(weight_t, d) : nullptr;
  if (weight != nullptr) {
    const int64_t stride = (d + kLane - 1) / kLane * kLane;
    std::vector<uint8_t> limbs((count * n + extra) * stride, 0);
    cut_limbs(vs, n, d, count, offset, extra, stride, limbs.data());
    dot_limb_rows(limbs.data(), count * n + extra, stride, weight, d, out_features, partial.data());
    return partial;
  }
  auto limbs = torch::empty({count * n + extra, d}, torch::kInt8);  // 7-bit limbs: the same bytes as int8
  cut_limbs(vs, n, d, count, offset, extra, d, reinterpret_cast<uint8_t*>(limbs.data_ptr<int8_t>()));
  const auto products = torch::_int_mm(limbs, weight_t).contiguous();
  std::copy_n(products.data_ptr<int32_t>(), partial.size(), partial.data());
  return partial;
}

}  // namespace

// (rows @ weight_t) mod p for rows int64 [n, d] in [0, p) and weight_t int8 [d, out] (any layout _int_mm takes).
torch::Tensor field_product(const torch::Tensor& rows, const torch::Tensor& weight_t, int64_t limb_count, int64_t p) {
  TORCH_CHECK(limb_count <= kMaxLimbs, "at most ", kMaxLimbs, " limbs");
  const auto partial = partial_products(rows, weight_t, limb_count, 0, 0);
  const int64_t n = rows.size(0), out_features = weight_t.size(1);
  auto product = torch::empty({n, out_features}, torch::kInt64);
  int64_t* out = product.data_ptr<int64_t>();
  for (int64_t e = 0; e < n * out_features; e++) {
    const int64_t total = recombine(partial.data(), n * out_features, e, limb_count) % p;
    out[e] = total < 0 ? total + p : total;
  }
  return product;
}

// rows @ weight_t as float64, exactly, for rows int64 [n, d] with |v| < 2^16: three unsigned limbs of v + 2^16,
// less 2^16 times each column's sum (the row of ones' product).
torch::Tensor signed_product(const torch::Tensor& rows, const torch::Tensor& weight_t, int64_t limb_count) {
  TORCH_CHECK(limb_count == 3, "the signed product cuts three limbs");
  check_rows(rows);
  const int64_t* vs = rows.data_ptr<int64_t>();
  for (int64_t e = 0; e < rows.numel(); e++)
    TORCH_CHECK(vs[e] > -kSignedOffset && vs[e] < kSignedOffset, "signed_product takes |v| < 2^16, not ", vs[e]);
  const auto partial = partial_products(rows, weight_t, limb_count, kSignedOffset, 1);
  const int64_t n = rows.size(0), out_features = weight_t.size(1);
  const int32_t* column_sums = partial.data() + limb_count * n * out_features;
  auto product = torch::empty({n, out_features}, torch::kFloat64);
  double* out = product.data_ptr<double>();
  for (int64_t e = 0; e < n * out_features; e++) {
    const int64_t total = recombine(partial.data(), n * out_features, e, limb_count) - kSignedOffset * column_sums[e % out_features];
    out[e] = static_cast<double>(total);  // |total| < 2^16 * 2048 * 127 < 2^53: exact as a double
  }
  return product;
}

bool dot_product_instructions() { return has_dot_product_instructions(); }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("field_product", &field_product);
  m.def("signed_product", &signed_product);
  m.def("dot_product_instructions", &dot_product_instructions);
}
