// kernels_cpu.cpp - one CPU kernel for decoding: y = x W^T (+ b) for a handful of rows.
//
// speculative.py builds it on first use (torch.utils.cpp_extension.load, a C++ compiler, no CUDA) as
// the `kernel` choice of StaticRunner(thin=...). Why it exists: at batch 1 a decode step multiplies 1
// row by each weight matrix, and a speculative verify multiplies gamma + 1 rows. Both should cost one
// pass over the weights (a 135M model's 540 MB of fp32 dwarf the x rows, which sit in L1), but the BLAS
// this repo's torch ships (MKL's sgemm, one thread, AVX2) streams W about once per row for 2-3 rows on
// the machine of docs/speculative.md, so a verify over 3 positions cost 2 plain steps. This kernel reads
// every weight once for up to 8 rows, whatever the shape.
//
// small_linear(x (M, K), w (N, K), b (N) or empty) -> y (M, N), fp32, 1 <= M <= 8:
//
//   for each output row n (one row of W):
//       acc[m] = 0 (8 lanes each)                             M registers
//       for k in 0, 8, 16, .. (8 floats per load):
//           w_n = W[n, k : k + 8]                              the weight, read once
//           for m < M: acc[m] += w_n * X[m, k : k + 8] (FMA)   x from L1 (X is M*K*4 bytes)
//       y[m, n] = sum of acc[m]'s 8 lanes + the k tail (K % 8) + b[n]
//
// Layout: W row-major (N, K), so the weight is one contiguous stream the hardware prefetcher follows.
// One weight row per block, not several: blocks of 2 or 4 rows (2-4 streams, more accumulators) were
// slower for every M on the machine of docs/speculative.md, SmolLM2-135M's 538 MB of weights, median
// ms of 21 interleaved passes: M = 1: 53 (1 row) vs 61 (4 rows); M = 2: 58 vs 75 (2 rows), 78 (4);
// M = 3: 61 vs 82; M = 4: 68 vs 89 (2 rows); M = 5: 68; M = 8: 86 (torch's sum over the same 538 MB:
// 41 ms). Each row of x past the first adds ~4 ms: its loads and FMAs no longer all hide behind the
// weight stream. One thread, the decoding thread (the demo decodes on one, decode_threads=1):
// a multi-threaded version would split the N rows over threads. The 8 lane sums are reduced in a
// different order than a BLAS would, so results match F.linear to rounding (tests/test_speculative.py:
// against a float64 x W^T); a row's sums do not depend on M, so a verify over M positions gives each
// position bit for bit what a one-row step gives it. Without AVX2 + FMA (checked at run time) a plain
// C++ loop of the same order runs instead.

#include <torch/extension.h>
#include <immintrin.h>

namespace {

template <int M>
__attribute__((target("avx2,fma")))
void rows_avx2(const float* x, const float* w, const float* b, float* y, int64_t K, int64_t N) {
  for (int64_t n = 0; n < N; ++n) {
    const float* wn = w + n * K;
    __m256 acc[M];
    for (int m = 0; m < M; ++m) acc[m] = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 8 <= K; k += 8) {
      const __m256 wv = _mm256_loadu_ps(wn + k);
      for (int m = 0; m < M; ++m) acc[m] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + m * K + k), acc[m]);
    }
    for (int m = 0; m < M; ++m) {  // 8 lanes -> 4 -> 1
      __m128 s = _mm_add_ps(_mm256_castps256_ps128(acc[m]), _mm256_extractf128_ps(acc[m], 1));
      s = _mm_hadd_ps(s, s);
      s = _mm_hadd_ps(s, s);
      float t = _mm_cvtss_f32(s);
      for (int64_t kk = k; kk < K; ++kk) t += x[m * K + kk] * wn[kk];
      y[m * N + n] = b ? t + b[n] : t;
    }
  }
}

void rows_scalar(int64_t M, const float* x, const float* w, const float* b, float* y, int64_t K, int64_t N) {
  for (int64_t n = 0; n < N; ++n)
    for (int64_t m = 0; m < M; ++m) {
      float t = 0.f;
      for (int64_t k = 0; k < K; ++k) t += x[m * K + k] * w[n * K + k];
      y[m * N + n] = b ? t + b[n] : t;
    }
}

}  // namespace

torch::Tensor small_linear_impl(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& b, bool avx2) {
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), "small_linear: CPU tensors only (x on ",
              x.device(), ", w on ", w.device(), ")");
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2, "small_linear: x must be (M, K) and w (N, K), got x ",
              x.sizes(), " and w ", w.sizes());
  TORCH_CHECK(x.scalar_type() == torch::kFloat && w.scalar_type() == torch::kFloat,
              "small_linear: float32 x and w only, got ", x.scalar_type(), " and ", w.scalar_type());
  TORCH_CHECK(x.is_contiguous() && w.is_contiguous(), "small_linear: x and w must be contiguous");
  TORCH_CHECK(x.size(1) == w.size(1), "small_linear: x has K = ", x.size(1), " columns, w has ", w.size(1));
  TORCH_CHECK(x.size(0) >= 1 && x.size(0) <= 8, "small_linear: 1 to 8 rows of x, got ", x.size(0),
              " (use F.linear for more)");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  const float* bp = nullptr;
  if (b.numel()) {
    TORCH_CHECK(b.dim() == 1 && b.size(0) == N && b.scalar_type() == torch::kFloat && b.is_contiguous() &&
                    b.device().is_cpu(),
                "small_linear: the bias must be a contiguous float32 CPU vector of N = ", N, ", got ", b.sizes());
    bp = b.data_ptr<float>();
  }
  auto y = torch::empty({M, N}, x.options());
  const float *xp = x.data_ptr<float>(), *wp = w.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  if (!avx2) {
    rows_scalar(M, xp, wp, bp, yp, K, N);
    return y;
  }
  switch (M) {
    case 1: rows_avx2<1>(xp, wp, bp, yp, K, N); break;
    case 2: rows_avx2<2>(xp, wp, bp, yp, K, N); break;
    case 3: rows_avx2<3>(xp, wp, bp, yp, K, N); break;
    case 4: rows_avx2<4>(xp, wp, bp, yp, K, N); break;
    case 5: rows_avx2<5>(xp, wp, bp, yp, K, N); break;
    case 6: rows_avx2<6>(xp, wp, bp, yp, K, N); break;
    case 7: rows_avx2<7>(xp, wp, bp, yp, K, N); break;
    default: rows_avx2<8>(xp, wp, bp, yp, K, N); break;
  }
  return y;
}

torch::Tensor small_linear(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& b) {
  static const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return small_linear_impl(x, w, b, avx2);
}

torch::Tensor small_linear_scalar(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& b) {
  return small_linear_impl(x, w, b, false);  // the fallback, callable anywhere (tests pin it too)
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("small_linear", &small_linear, "y = x W^T (+ b) for 1-8 rows of x, every weight read once (fp32, CPU)",
        pybind11::arg("x"), pybind11::arg("w"), pybind11::arg("b"));
  m.def("small_linear_scalar", &small_linear_scalar, "small_linear's plain C++ fallback (no AVX2)",
        pybind11::arg("x"), pybind11::arg("w"), pybind11::arg("b"));
}
