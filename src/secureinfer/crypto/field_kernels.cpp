// field.py's int8 route in one call each: cut the limbs, multiply, and recombine (see native.py for why).
// Integers throughout, so the results are field.py's torch steps' exactly. Cutting and recombining take AVX512
// where the CPU has it (`vector`; tests run both paths): a prefill's products are ~1M outputs each, which the
// torch steps cut and recombined in ~12 passes, and the scalar loops reduce mod p by an integer division each.
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
constexpr int kSignedOffsetBits = 16;
constexpr int64_t kSignedOffset = int64_t{1} << kSignedOffsetBits;
// field.P = 2^35 - 31, whose form reduces an int64 by a shift, a mask and a multiply by 31 (`reduce_avx512`).
constexpr int64_t kFieldBits = 35;
constexpr int64_t kFieldPrime = (int64_t{1} << kFieldBits) - 31;
// Elements per task when a many-row cut or recombination is split over torch's threads.
constexpr int64_t kGrainElements = 1 << 15;

#define AVX512 __attribute__((target("avx512f,avx512dq,avx512vl")))

// The lanes of an 8-lane vector that hold one of the `left` elements still to do.
inline __mmask8 first_lanes(int64_t left) { return left >= 8 ? 0xff : static_cast<__mmask8>((1u << left) - 1); }

bool has_avx512() {
  static const bool has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
                          __builtin_cpu_supports("avx512vl");
  return has;
}

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
// limb-major, for rows [begin, end); the caller adds the `extra` rows of ones and zeroes what lies past d.
void cut_limbs(const int64_t* vs, int64_t n, int64_t d, int64_t count, int64_t offset, int64_t stride, uint8_t* limbs,
               int64_t begin, int64_t end) {
  for (int64_t k = 0; k < count; k++)
    for (int64_t r = begin; r < end; r++)
      for (int64_t i = 0; i < d; i++) limbs[(k * n + r) * stride + i] = ((vs[r * d + i] + offset) >> (kLimbBits * k)) & kLimbMask;
}

AVX512 void cut_limbs_avx512(const int64_t* vs, int64_t n, int64_t d, int64_t count, int64_t offset, int64_t stride,
                             uint8_t* limbs, int64_t begin, int64_t end) {
  const __m512i shift = _mm512_set1_epi64(offset), mask = _mm512_set1_epi64(kLimbMask);
  for (int64_t r = begin; r < end; r++) {
    for (int64_t i = 0; i < d; i += 8) {
      const __mmask8 lanes = first_lanes(d - i);
      const __m512i v = _mm512_add_epi64(_mm512_maskz_loadu_epi64(lanes, vs + r * d + i), shift);
      for (int64_t k = 0; k < count; k++) {  // arithmetic shifts, as the scalar loop's >>
        const __m512i limb = _mm512_and_si512(_mm512_sra_epi64(v, _mm_cvtsi64_si128(kLimbBits * k)), mask);
        _mm512_mask_cvtepi64_storeu_epi8(limbs + (k * n + r) * stride + i, lanes, limb);
      }
    }
  }
}

// Runs row(begin, end) over the n rows of an [n, columns] array, split over torch's threads.
template <typename Rows>
void for_rows(int64_t n, int64_t columns, const Rows& row) {
  at::parallel_for(0, n, std::max<int64_t>(1, kGrainElements / std::max<int64_t>(columns, 1)), row);
}

// The limbs' int32 partial products with the weight ([count * n + extra, out], limb-major), by whichever multiply
// applies (see the top of the file); `extra` appends rows of ones, whose products are the weight's column sums.
torch::Tensor partial_products(const torch::Tensor& rows, const torch::Tensor& weight_t, int64_t count,
                               int64_t offset, int64_t extra, bool vector) {
  check_rows(rows);
  const int64_t n = rows.size(0), d = rows.size(1), out_features = weight_t.size(1), limb_rows = count * n + extra;
  TORCH_CHECK(weight_t.size(0) == d, "weight_t must be [", d, ", out], not ", weight_t.sizes());
  const int64_t* vs = rows.data_ptr<int64_t>();
  const bool ours = n <= kMaxDotRows && at::get_num_threads() == 1 && has_dot_product_instructions();
  const int8_t* weight = ours ? rows_by_output(weight_t, d) : nullptr;
  if (weight != nullptr) {
    const int64_t stride = (d + kLane - 1) / kLane * kLane;
    std::vector<uint8_t> limbs(limb_rows * stride, 0);
    cut_limbs(vs, n, d, count, offset, stride, limbs.data(), 0, n);
    for (int64_t row = count * n; row < limb_rows; row++) std::fill_n(limbs.data() + row * stride, d, uint8_t{1});
    auto partial = torch::empty({limb_rows, out_features}, torch::kInt32);
    dot_limb_rows(limbs.data(), limb_rows, stride, weight, d, out_features, partial.data_ptr<int32_t>());
    return partial;
  }
  auto limbs = torch::empty({limb_rows, d}, torch::kInt8);  // 7-bit limbs: the same bytes as int8
  uint8_t* bytes = reinterpret_cast<uint8_t*>(limbs.data_ptr<int8_t>());
  const bool avx512 = vector && has_avx512();
  for_rows(n, d, [&](int64_t begin, int64_t end) {
    if (avx512) {
      cut_limbs_avx512(vs, n, d, count, offset, d, bytes, begin, end);
    } else {
      cut_limbs(vs, n, d, count, offset, d, bytes, begin, end);
    }
  });
  std::fill_n(bytes + count * n * d, extra * d, uint8_t{1});
  return torch::_int_mm(limbs, weight_t).contiguous();
}

// Horner over `count` limb products of 8 outputs from `at`, each `per_limb` apart, in int64: no overflow (the
// bounds of `recombine`).
AVX512 __m512i recombine_avx512(const int32_t* partial, int64_t per_limb, int64_t at, int64_t count, __mmask8 lanes) {
  __m512i total = _mm512_cvtepi32_epi64(_mm256_maskz_loadu_epi32(lanes, partial + (count - 1) * per_limb + at));
  for (int64_t k = count - 2; k >= 0; k--) {
    const __m512i limb = _mm512_cvtepi32_epi64(_mm256_maskz_loadu_epi32(lanes, partial + k * per_limb + at));
    total = _mm512_add_epi64(_mm512_slli_epi64(total, kLimbBits), limb);
  }
  return total;
}

// The residue in [0, P) of |t| < 2^53: t = hi 2^35 + lo, lo in [0, 2^35), and 2^35 = 31 mod P, so t = lo + 31 hi,
// in (-31 * 2^18, 2^35 + 31 * 2^18): one correction either way.
AVX512 __m512i reduce_avx512(__m512i t) {
  const __m512i prime = _mm512_set1_epi64(kFieldPrime), zero = _mm512_setzero_si512();
  const __m512i high = _mm512_srai_epi64(t, kFieldBits);
  const __m512i low = _mm512_and_si512(t, _mm512_set1_epi64((int64_t{1} << kFieldBits) - 1));
  __m512i residue = _mm512_add_epi64(low, _mm512_sub_epi64(_mm512_slli_epi64(high, 5), high));
  residue = _mm512_mask_add_epi64(residue, _mm512_cmplt_epi64_mask(residue, zero), residue, prime);
  return _mm512_mask_sub_epi64(residue, _mm512_cmpge_epi64_mask(residue, prime), residue, prime);
}

AVX512 void field_row_avx512(const int32_t* partial, int64_t per_limb, int64_t at, int64_t columns, int64_t count,
                             int64_t* out) {
  for (int64_t j = 0; j < columns; j += 8) {
    const __mmask8 lanes = first_lanes(columns - j);
    _mm512_mask_storeu_epi64(out + j, lanes, reduce_avx512(recombine_avx512(partial, per_limb, at + j, count, lanes)));
  }
}

AVX512 void signed_row_avx512(const int32_t* partial, int64_t per_limb, int64_t at, int64_t columns, int64_t count,
                              const int32_t* column_sums, double* out) {
  for (int64_t j = 0; j < columns; j += 8) {
    const __mmask8 lanes = first_lanes(columns - j);
    const __m512i sums = _mm512_cvtepi32_epi64(_mm256_maskz_loadu_epi32(lanes, column_sums + j));
    const __m512i total = _mm512_sub_epi64(recombine_avx512(partial, per_limb, at + j, count, lanes),
                                           _mm512_slli_epi64(sums, kSignedOffsetBits));
    _mm512_mask_storeu_pd(out + j, lanes, _mm512_cvtepi64_pd(total));
  }
}

}  // namespace

// (rows @ weight_t) mod p for rows int64 [n, d] in [0, p) and weight_t int8 [d, out] (any layout _int_mm takes).
torch::Tensor field_product(const torch::Tensor& rows, const torch::Tensor& weight_t, int64_t limb_count, int64_t p,
                            bool vector) {
  TORCH_CHECK(limb_count <= kMaxLimbs, "at most ", kMaxLimbs, " limbs");
  const auto partial = partial_products(rows, weight_t, limb_count, 0, 0, vector);
  const int64_t n = rows.size(0), out_features = weight_t.size(1), per_limb = n * out_features;
  auto product = torch::empty({n, out_features}, torch::kInt64);
  const int32_t* ps = partial.data_ptr<int32_t>();
  int64_t* out = product.data_ptr<int64_t>();
  const bool avx512 = vector && has_avx512() && p == kFieldPrime;  // its reduction is P's alone
  for_rows(n, out_features, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; r++) {
      const int64_t at = r * out_features;
      if (avx512) {
        field_row_avx512(ps, per_limb, at, out_features, limb_count, out + at);
        continue;
      }
      for (int64_t e = at; e < at + out_features; e++) {
        const int64_t total = recombine(ps, per_limb, e, limb_count) % p;
        out[e] = total < 0 ? total + p : total;
      }
    }
  });
  return product;
}

// rows @ weight_t as float64, exactly, for rows int64 [n, d] with |v| < 2^16: three unsigned limbs of v + 2^16,
// less 2^16 times each column's sum (the row of ones' product).
torch::Tensor signed_product(const torch::Tensor& rows, const torch::Tensor& weight_t, int64_t limb_count,
                             bool vector) {
  TORCH_CHECK(limb_count == 3, "the signed product cuts three limbs");
  check_rows(rows);
  const int64_t* vs = rows.data_ptr<int64_t>();
  int64_t lowest = 0, highest = 0;
  for (int64_t e = 0; e < rows.numel(); e++) {
    lowest = std::min(lowest, vs[e]);
    highest = std::max(highest, vs[e]);
  }
  for (const int64_t edge : {lowest, highest})
    TORCH_CHECK(edge > -kSignedOffset && edge < kSignedOffset, "signed_product takes |v| < 2^16, not ", edge);
  const auto partial = partial_products(rows, weight_t, limb_count, kSignedOffset, 1, vector);
  const int64_t n = rows.size(0), out_features = weight_t.size(1), per_limb = n * out_features;
  const int32_t* ps = partial.data_ptr<int32_t>();
  const int32_t* column_sums = ps + limb_count * per_limb;
  auto product = torch::empty({n, out_features}, torch::kFloat64);
  double* out = product.data_ptr<double>();
  const bool avx512 = vector && has_avx512();
  for_rows(n, out_features, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; r++) {
      const int64_t at = r * out_features;
      if (avx512) {
        signed_row_avx512(ps, per_limb, at, out_features, limb_count, column_sums, out + at);
        continue;
      }
      for (int64_t j = 0; j < out_features; j++) {
        const int64_t total = recombine(ps, per_limb, at + j, limb_count) - kSignedOffset * column_sums[j];
        out[at + j] = static_cast<double>(total);  // |total| < 2^16 * 2048 * 127 < 2^53: exact as a double
      }
    }
  });
  return product;
}

bool dot_product_instructions() { return has_dot_product_instructions(); }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("field_product", &field_product);
  m.def("signed_product", &signed_product);
  m.def("dot_product_instructions", &dot_product_instructions);
  m.def("avx512", &has_avx512);
}
