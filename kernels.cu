// kernels.cu - the CUDA extension `llm_kernels`: fused flash attention (forward + backward) and a
// weight-only quantized matmul with the dequantization fused into the inner loop.
//
// What it is. attention_flash.py and quant.py explain the algorithms in PyTorch; this file is the same
// arithmetic written as GPU kernels, so that a CUDA tensor never materialises the (T, T) attention
// scores or a dequantized fp16 weight matrix. attention_flash.flash_attention and
// quant.QuantLinear.forward call these kernels when the extension is built and the tensors live on a
// GPU; the PyTorch code stays the reference every kernel is tested against (tests/test_kernels.py).
//
// Build
//     pip install -e .                  # setup.py builds it when torch has CUDA and nvcc is found
//     python -c "import llm_kernels"    # succeeds only when the extension was built
//     python bench_kernels.py           # validate against PyTorch, then time vs SDPA-flash / cuBLAS
// The default architectures are sm_80 and sm_90 (+PTX); bf16 tensor-core instructions need sm_80.
//
// Kernels (each has its PyTorch reference quoted above it)
//   1. flash_fwd_kernel   FlashAttention-2 forward (Dao 2023, arXiv:2307.08691, Algorithm 1): one block
//                         per (64-query tile, batch x head); Q K^T and P V on tensor cores (WMMA,
//                         16x16x16 bf16/fp16 -> fp32), online softmax in fp32 on CUDA cores.
//   2. flash_bwd_*        FlashAttention-2 backward (Algorithm 2): D = rowsum(dO * O), then one block
//                         per (64-key tile, batch x kv head) accumulating dK, dV in registers and dQ with
//                         fp32 atomicAdd; dsinks from L and D with three tensor ops on the host.
//   3. quant_gemv_kernel  y = x W^T for M <= 8 rows of x (decoding): memory-bound, one warp streams
//                         one row of packed int8 / int4 weights in 16-byte loads.
//      quant_gemm_kernel  M > 8: 64x64 output tiles, the weight tile dequantized into shared memory,
//                         tensor-core (WMMA) products.
//
// Measured speed: NONE YET. This file was written and compiled (nvcc 13.0, sm_90) on a machine without
// a GPU; neither correctness on a GPU nor speed has been measured. Run tests/test_kernels.py and
// bench_kernels.py on a GPU before trusting it, and record the figures here and in docs/kernels.md.
// Targets (H100; the H200 has the same math rates): forward >= 50% and backward >= 30% of SDPA-flash
// at T=4096, hs 64/128, bf16, causal; int8 GEMV >= 1.6x and int4 GEMV >= 2.5x the fp16 cuBLAS GEMV
// (memory-bound ideal: 2x, 4x).
//
// Conventions shared with attention_flash.py (see its "Dispatch" section)
//   q (B, nh, Tq, hs), k and v (B, nkv, Tk, hs), contiguous, bf16 or fp16, hs in {64, 128}; query head
//   h reads kv head h / (nh / nkv). Queries are bottom-right aligned: query i sits at absolute position
//   p = Tk - Tq + i, and sees key j iff  (not causal or j <= p)  and  (window == 0 or |p - j| < window).
//   sinks (nh,) or None: a per-head logit of an extra "null" key whose value is 0. A row that sees no
//   key (and has no sink) outputs 0 and has lse = +inf. lse (B, nh, Tq) fp32 = log sum_j exp(s_j).
//
// Not covered: soft-capping, dropout, variable-length batches, KV-cache paging, FP8, the asynchronous
// copies (cp.async / TMA), swizzled layouts and warp specialisation that make FlashAttention-2/3 fast.

#include <ATen/ATen.h>  // lighter than torch/extension.h: ~half the compile time
#include <torch/csrc/utils/pybind.h>  // pybind11 + the at::Tensor <-> torch.Tensor casters
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <pybind11/stl.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <cmath>
#include <cstdint>
#include <optional>
#include <string>
#include <tuple>

namespace wmma = nvcuda::wmma;

// -----------------------------------------------------------------------------------------------
// Device helpers

__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
    return __float2bfloat16(x);
}

__device__ __forceinline__ float warp_max(float x) {  // butterfly: every lane ends with the max
    for (int o = 16; o > 0; o /= 2) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
    return x;
}

__device__ __forceinline__ float warp_sum(float x) {
    for (int o = 16; o > 0; o /= 2) x += __shfl_xor_sync(0xffffffffu, x, o);
    return x;
}

// The masking rule of gpt.attention_mask, for a query at absolute position p and a key j >= 0.
__device__ __forceinline__ bool key_visible(int p, int j, int Tk, bool causal, int window) {
    if (j >= Tk) return false;                          // padding of the last key tile
    if (causal && j > p) return false;                  // the future
    if (window > 0 && abs(p - j) >= window) return false;  // outside the sliding window
    return true;
}

// Copy rows row0 .. row0+ROWS-1 of a row-major (n_rows, HS) 16-bit matrix into shared memory with row
// stride LD, in 16-byte vectors (8 elements); rows >= n_rows become zeros (never garbage: 0 * NaN is
// NaN, so even a masked-out row must hold finite numbers).
template <typename T, int HS, int LD, int ROWS, int NTHREADS>
__device__ __forceinline__ void load_rows(T* dst, const T* src, int row0, int n_rows) {
    constexpr int VPR = HS / 8;  // vectors per row
    for (int idx = threadIdx.x; idx < ROWS * VPR; idx += NTHREADS) {
        const int r = idx / VPR, c = (idx % VPR) * 8;
        uint4 val = make_uint4(0u, 0u, 0u, 0u);
        if (row0 + r < n_rows) val = *reinterpret_cast<const uint4*>(src + (size_t)(row0 + r) * HS + c);
        *reinterpret_cast<uint4*>(dst + r * LD + c) = val;
    }
}

// WMMA fragments: 16x16x16 tiles, 16-bit inputs, fp32 accumulators. A "row_major" operand reads
// element (r, c) at ptr[r * ld + c], a "col_major" one at ptr[c * ld + r]: loading a row-major K tile
// as a col_major B operand therefore gives K^T without moving any data. Pointers must be 32-byte
// aligned and ld a multiple of 8 (16-bit) or 4 (fp32) elements; the padded strides below keep both.
template <typename T> using FragA = wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major>;
template <typename T> using FragAt = wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::col_major>;
template <typename T> using FragB = wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major>;
template <typename T> using FragBt = wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major>;
using FragC = wmma::fragment<wmma::accumulator, 16, 16, 16, float>;

// -----------------------------------------------------------------------------------------------
// 1. Flash attention forward
//
// PyTorch reference (attention_flash.flash_attn_forward, gpt.naive_attention):
//     S = (q @ k^T) / sqrt(hs), masked with -inf;  P = softmax([S, sink]);  o = P[:, :Tk] @ v
//     lse = logsumexp([S, sink], -1)
//
// Layout: grid (ceil(Tq / BR), B * nh), 4 warps. The block owns BR = 64 queries of one head; warp w
// owns query rows 16w .. 16w+15 of the tile *for every step*, so within a key tile the warps only
// meet at the K/V load. Per key tile j0 .. j0+63 (only tiles some query can see):
//     Ks, Vs <- K[j0:j0+64], V[j0:j0+64]                        (all threads, 16-byte loads)
//     S[16 rows, 64]  = Q[16 rows] K^T            tensor cores, fp32 -> Ss (shared)
//     for each row r:  m' = max(m, max_j S_rj * scale)           lanes hold 2 of the 64 columns
//                      P_rj = exp(S_rj * scale - m'),  alpha = exp(m - m')          (Alg 1 l.9)
//                      l = alpha l + sum_j P_rj,  O_r *= alpha                        (Alg 1 l.9-10)
//     O[16 rows, hs] += P V                        tensor cores, fp32 accumulator in shared memory
// then O /= l and lse = m + log(l) (Alg 1 l.12-13). A sink starts the row at m = s_h, l = 1.
// O lives in shared memory (fp32) rather than in WMMA registers because the per-row rescaling by
// alpha needs to know which row each element belongs to, and WMMA's register layout is opaque.

constexpr int FWD_BR = 64;     // queries per block
constexpr int FWD_BC = 64;     // keys per tile
constexpr int FWD_WARPS = 4;   // warp w owns query rows 16w .. 16w+15
constexpr int FWD_THREADS = 32 * FWD_WARPS;
static_assert(FWD_BR == 16 * FWD_WARPS, "each warp owns 16 query rows");
static_assert(FWD_BC == 64, "the softmax gives each lane columns lane and lane + 32");

template <int HS>
struct FwdSmem {  // byte offsets into the dynamic shared memory
    static constexpr int LDH = HS + 8;      // 16-bit Q/K/V tiles (+8 pads rows apart in the banks)
    static constexpr int LDS = FWD_BC + 4;  // fp32 scores
    static constexpr int LDP = FWD_BC + 8;  // 16-bit probabilities
    static constexpr int LDO = HS + 4;      // fp32 output accumulator
    static constexpr size_t Q = 0;
    static constexpr size_t K = Q + (size_t)FWD_BR * LDH * 2;
    static constexpr size_t V = K + (size_t)FWD_BC * LDH * 2;
    static constexpr size_t S = V + (size_t)FWD_BC * LDH * 2;
    static constexpr size_t P = S + (size_t)FWD_BR * LDS * 4;
    static constexpr size_t O = P + (size_t)FWD_BR * LDP * 2;
    static constexpr size_t BYTES = O + (size_t)FWD_BR * LDO * 4;
    static_assert(K % 32 == 0 && V % 32 == 0 && S % 32 == 0 && P % 32 == 0 && O % 32 == 0,
                  "WMMA needs 32-byte aligned tiles");
};

template <typename T, int HS>
__global__ void __launch_bounds__(FWD_THREADS)
flash_fwd_kernel(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                 const float* __restrict__ sinks, T* __restrict__ o, float* __restrict__ lse,
                 int nh, int nkv, int Tq, int Tk, bool causal, int window, float scale) {
    using L = FwdSmem<HS>;
    extern __shared__ __align__(128) unsigned char smem[];
    T* Qs = reinterpret_cast<T*>(smem + L::Q);      // (BR, LDH)
    T* Ks = reinterpret_cast<T*>(smem + L::K);      // (BC, LDH)
    T* Vs = reinterpret_cast<T*>(smem + L::V);      // (BC, LDH)
    float* Ss = reinterpret_cast<float*>(smem + L::S);  // (BR, LDS)
    T* Ps = reinterpret_cast<T*>(smem + L::P);      // (BR, LDP)
    float* Os = reinterpret_cast<float*>(smem + L::O);  // (BR, LDO)

    const int bh = blockIdx.y;                      // b * nh + h
    const int b = bh / nh, h = bh % nh;
    const int kvh = h / (nh / nkv);                 // GQA: the kv head this query head reads
    const int i0 = blockIdx.x * FWD_BR;             // first query (index into Tq) of the tile
    const int off = Tk - Tq;                        // query i sits at absolute position off + i
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const T* qp = q + (size_t)bh * Tq * HS;                     // (Tq, HS) of this head
    const T* kp = k + ((size_t)b * nkv + kvh) * Tk * HS;        // (Tk, HS) of its kv head
    const T* vp = v + ((size_t)b * nkv + kvh) * Tk * HS;

    load_rows<T, HS, L::LDH, FWD_BR, FWD_THREADS>(Qs, qp, i0, Tq);
    for (int idx = threadIdx.x; idx < FWD_BR * L::LDO; idx += FWD_THREADS) Os[idx] = 0.f;  // Alg 1 l.5

    // Running max m and sum l of this warp's 16 rows; every lane keeps identical copies.
    float m_run[16], l_run[16];
    const float m0 = sinks ? sinks[h] : -INFINITY;  // a sink is a first key with score s_h, value 0
#pragma unroll
    for (int rr = 0; rr < 16; ++rr) {
        m_run[rr] = m0;
        l_run[rr] = sinks ? 1.f : 0.f;
    }
    __syncthreads();  // Q and the zeroed O are complete (the epilogue reads O even if no key tile runs)

    // The keys any query of the tile can see: [j_lo, j_hi] (the per-element mask does the rest).
    const int p_first = off + i0, p_last = off + min(i0 + FWD_BR, Tq) - 1;
    int j_lo = 0, j_hi = Tk - 1;
    if (window > 0) j_lo = max(j_lo, p_first - window + 1);
    if (causal) j_hi = min(j_hi, p_last);
    else if (window > 0) j_hi = min(j_hi, p_last + window - 1);

    for (int j0 = (j_lo / FWD_BC) * FWD_BC; j0 <= j_hi; j0 += FWD_BC) {  // Alg 1 l.6
        __syncthreads();  // every warp is done reading the previous Ks/Vs
        load_rows<T, HS, L::LDH, FWD_BC, FWD_THREADS>(Ks, kp, j0, Tk);  // Alg 1 l.7
        load_rows<T, HS, L::LDH, FWD_BC, FWD_THREADS>(Vs, vp, j0, Tk);
        __syncthreads();  // the tiles are complete before any warp reads them

        // S = Q_i K_j^T for rows 16w .. 16w+15 (Alg 1 l.8), unscaled, fp32 into Ss.
        for (int c = 0; c < FWD_BC / 16; ++c) {
            FragC acc;
            wmma::fill_fragment(acc, 0.f);
#pragma unroll
            for (int d = 0; d < HS / 16; ++d) {
                FragA<T> a;
                FragBt<T> bt;
                wmma::load_matrix_sync(a, Qs + 16 * warp * L::LDH + 16 * d, L::LDH);
                wmma::load_matrix_sync(bt, Ks + 16 * c * L::LDH + 16 * d, L::LDH);  // K^T
                wmma::mma_sync(acc, a, bt, acc);
            }
            wmma::store_matrix_sync(Ss + 16 * warp * L::LDS + 16 * c, acc, L::LDS, wmma::mem_row_major);
        }
        __syncwarp();  // this warp's scores are in Ss before its lanes read other lanes' columns

        // Online softmax, one row at a time; lane holds columns lane and lane + 32.
#pragma unroll
        for (int rr = 0; rr < 16; ++rr) {
            const int r = 16 * warp + rr;
            const int p = off + i0 + r;  // absolute position of this query
            const float s0 = key_visible(p, j0 + lane, Tk, causal, window)
                                 ? Ss[r * L::LDS + lane] * scale : -INFINITY;
            const float s1 = key_visible(p, j0 + lane + 32, Tk, causal, window)
                                 ? Ss[r * L::LDS + lane + 32] * scale : -INFINITY;
            const float m_new = fmaxf(m_run[rr], warp_max(fmaxf(s0, s1)));  // Alg 1 l.9
            // A row that has seen nothing yet keeps m = -inf; use 0 as its reference so that
            // exp(-inf - 0) = 0 instead of exp(-inf + inf) = NaN.
            const float m_ref = m_new == -INFINITY ? 0.f : m_new;
            const float p0 = __expf(s0 - m_ref), p1 = __expf(s1 - m_ref);  // P~ = exp(S - m)
            const float alpha = __expf(m_run[rr] - m_ref);                 // exp(m_old - m_new) <= 1
            l_run[rr] = alpha * l_run[rr] + warp_sum(p0 + p1);               // l = alpha l + rowsum(P~)
            m_run[rr] = m_new;
            Ps[r * L::LDP + lane] = from_float<T>(p0);
            Ps[r * L::LDP + lane + 32] = from_float<T>(p1);
            for (int d = lane; d < HS; d += 32) Os[r * L::LDO + d] *= alpha;  // Alg 1 l.10: O *= alpha
        }
        __syncwarp();  // P and the rescaled O rows are in shared memory before the tensor cores read them

        // O[rows 16w.., :] += P V_j (Alg 1 l.10), accumulating straight into Os.
        for (int n = 0; n < HS / 16; ++n) {
            FragC acc;
            wmma::load_matrix_sync(acc, Os + 16 * warp * L::LDO + 16 * n, L::LDO, wmma::mem_row_major);
#pragma unroll
            for (int kk = 0; kk < FWD_BC / 16; ++kk) {
                FragA<T> a;
                FragB<T> bv;
                wmma::load_matrix_sync(a, Ps + 16 * warp * L::LDP + 16 * kk, L::LDP);
                wmma::load_matrix_sync(bv, Vs + 16 * kk * L::LDH + 16 * n, L::LDH);
                wmma::mma_sync(acc, a, bv, acc);
            }
            wmma::store_matrix_sync(Os + 16 * warp * L::LDO + 16 * n, acc, L::LDO, wmma::mem_row_major);
        }
    }
    __syncwarp();  // the last P V products are in Os before the lanes read them

    // Alg 1 l.12-13: O / l and L = m + log(l). l = 0 only for a row with no visible key and no sink:
    // its output is 0 and its lse +inf, which makes every probability the backward recomputes 0.
#pragma unroll
    for (int rr = 0; rr < 16; ++rr) {
        const int r = 16 * warp + rr, i = i0 + r;
        if (i >= Tq) continue;  // padding rows of the last query tile
        const float l = l_run[rr];
        const float inv = l > 0.f ? 1.f / l : 0.f;
        T* orow = o + ((size_t)bh * Tq + i) * HS;
        for (int d = lane; d < HS; d += 32) orow[d] = from_float<T>(Os[r * L::LDO + d] * inv);
        if (lane == 0) lse[(size_t)bh * Tq + i] = l > 0.f ? m_run[rr] + logf(l) : INFINITY;
    }
}

// -----------------------------------------------------------------------------------------------
// 2. Flash attention backward
//
// PyTorch reference (attention_flash.flash_attn_backward), with S = scale q k^T and P = exp(S - lse):
//     D = rowsum(dO * O)                         (Alg 2 l.4)
//     dV = P^T dO,  dP = dO V^T,  dS = P * (dP - D),  dQ = scale dS K,  dK = scale dS^T Q   (l.11-16)
//     dsinks_h = -sum over rows of head h of exp(s_h - lse) * D
//
// (a) flash_bwd_dot_kernel: D, one warp per row (B * nh * Tq rows), fp32.
// (b) flash_bwd_kernel: grid (ceil(Tk / BC), B * nkv), HS / 16 warps (4 for hs 64, 8 for hs 128).
//     The block owns BC = 64 keys of one kv head and loops over the rep = nh / nkv query heads that
//     share it and over their query tiles of BR rows (64 for hs 64, 32 for hs 128, to fit shared
//     memory), keeping only the tiles some query can see. Warp w owns columns 16w .. 16w+15 of dK and
//     dV for all 64 keys: 4 + 4 WMMA accumulators that stay in registers for the whole block (plain
//     sums, so the opaque register layout does not matter) and are written once at the end (Alg 2 l.18).
//     Per query tile, steps separated by __syncthreads():
//         Qs, dOs, lse, D <- this tile                                   (Alg 2 l.9)
//         S  = Q K^T                     -> Ss  (fp32)   tiles spread over warps   (l.10)
//         P  = exp(S scale - lse), masked -> Ss (fp32) and Ps (16-bit)           (l.11)
//         dV += P^T dO  (own columns);  dP = dO V^T -> dPs (fp32)                  (l.12-13)
//         dS = P (dP - D)               -> Ps (16-bit; P is no longer needed)      (l.14)
//         dK += dS^T Q  (own columns);  dQ += scale dS K  with fp32 atomicAdd      (l.15-16)
//     dQ's atomics go through a 16x16 per-warp staging tile, because only there do we know which
//     (row, column) each accumulator element is.
// (c) The host converts the fp32 dQ to the input dtype and computes dsinks with tensor ops.

template <int HS>
struct BwdCfg {
    static constexpr int WARPS = HS / 16;           // warp w owns dK/dV columns 16w .. 16w+15
    static constexpr int THREADS = 32 * WARPS;
    static constexpr int BC = 64;                   // keys per block
    static constexpr int BR = HS == 128 ? 32 : 64;  // queries per inner tile
    static constexpr int LDH = HS + 8;
    static constexpr int LDS = BC + 4;
    static constexpr int LDP = BC + 8;
    static constexpr size_t K = 0;
    static constexpr size_t V = K + (size_t)BC * LDH * 2;
    static constexpr size_t Q = V + (size_t)BC * LDH * 2;
    static constexpr size_t DO = Q + (size_t)BR * LDH * 2;
    static constexpr size_t S = DO + (size_t)BR * LDH * 2;
    static constexpr size_t DP = S + (size_t)BR * LDS * 4;
    static constexpr size_t P = DP + (size_t)BR * LDS * 4;
    static constexpr size_t STAGE = P + (size_t)BR * LDP * 2;     // WARPS x (16 x 16) fp32
    static constexpr size_t LSE = STAGE + (size_t)WARPS * 256 * 4;
    static constexpr size_t D = LSE + (size_t)BR * 4;
    static constexpr size_t BYTES = D + (size_t)BR * 4;
    static_assert(V % 32 == 0 && Q % 32 == 0 && DO % 32 == 0 && S % 32 == 0 && DP % 32 == 0 &&
                  P % 32 == 0 && STAGE % 32 == 0, "WMMA needs 32-byte aligned tiles");
    static_assert(BC / 16 == 4, "each warp keeps 4 dK and 4 dV accumulators");
};

template <typename T, int HS>
__global__ void flash_bwd_dot_kernel(const T* __restrict__ dout, const T* __restrict__ out,
                                     float* __restrict__ D, int rows) {
    const int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (row >= rows) return;
    float acc = 0.f;
    for (int d = lane; d < HS; d += 32)
        acc += to_float(dout[(size_t)row * HS + d]) * to_float(out[(size_t)row * HS + d]);
    acc = warp_sum(acc);
    if (lane == 0) D[row] = acc;  // Alg 2 l.4: D_i = rowsum(dO_i * O_i)
}

template <typename T, int HS>
__global__ void __launch_bounds__(BwdCfg<HS>::THREADS)
flash_bwd_kernel(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                 const T* __restrict__ dout, const float* __restrict__ lse, const float* __restrict__ D,
                 float* __restrict__ dq, T* __restrict__ dk, T* __restrict__ dv,
                 int nh, int nkv, int Tq, int Tk, bool causal, int window, float scale) {
    using C = BwdCfg<HS>;
    constexpr int BR = C::BR, BC = C::BC, NT = C::THREADS;
    extern __shared__ __align__(128) unsigned char smem[];
    T* Ks = reinterpret_cast<T*>(smem + C::K);          // (BC, LDH)
    T* Vs = reinterpret_cast<T*>(smem + C::V);          // (BC, LDH)
    T* Qs = reinterpret_cast<T*>(smem + C::Q);          // (BR, LDH)
    T* dOs = reinterpret_cast<T*>(smem + C::DO);        // (BR, LDH)
    float* Ss = reinterpret_cast<float*>(smem + C::S);  // (BR, LDS): S, then P
    float* dPs = reinterpret_cast<float*>(smem + C::DP);  // (BR, LDS)
    T* Ps = reinterpret_cast<T*>(smem + C::P);          // (BR, LDP): P, then dS
    float* stage = reinterpret_cast<float*>(smem + C::STAGE) + (threadIdx.x / 32) * 256;  // this warp's
    float* lse_s = reinterpret_cast<float*>(smem + C::LSE);  // (BR,)
    float* D_s = reinterpret_cast<float*>(smem + C::D);      // (BR,)

    const int bkv = blockIdx.y;                 // b * nkv + kv head
    const int b = bkv / nkv, kvh = bkv % nkv;
    const int rep = nh / nkv;  // query heads per kv head (GQA)
    const int j0 = blockIdx.x * BC;             // first key of the block
    const int j1 = min(j0 + BC, Tk);            // one past the last real key
    const int off = Tk - Tq;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;

    load_rows<T, HS, C::LDH, BC, NT>(Ks, k + (size_t)bkv * Tk * HS, j0, Tk);  // Alg 2 l.6
    load_rows<T, HS, C::LDH, BC, NT>(Vs, v + (size_t)bkv * Tk * HS, j0, Tk);

    FragC dK_acc[4], dV_acc[4];  // rows 16kr .. 16kr+15 of the key tile, columns 16w .. 16w+15
#pragma unroll
    for (int kr = 0; kr < 4; ++kr) {  // Alg 2 l.7
        wmma::fill_fragment(dK_acc[kr], 0.f);
        wmma::fill_fragment(dV_acc[kr], 0.f);
    }

    // Queries that can see a key of [j0, j1): absolute positions [p_lo, p_hi] (64-bit: no overflow).
    long long p_lo = -(1LL << 40);                                    // no lower bound
    if (causal) p_lo = j0;                                            // j <= p
    if (window > 0) p_lo = max(p_lo, (long long)j0 - window + 1);     // p - j < window
    const long long p_hi = window > 0 ? (long long)j1 - 1 + window - 1 : (1LL << 40);
    const int i_lo = (int)max(0LL, p_lo - off);
    const int i_hi = (int)min((long long)Tq - 1, p_hi - off);

    for (int g = 0; g < rep; ++g) {  // the query heads that share this kv head
        const int bh = b * nh + kvh * rep + g;
        const T* qp = q + (size_t)bh * Tq * HS;
        const T* dop = dout + (size_t)bh * Tq * HS;
        for (int i0 = (i_lo / BR) * BR; i0 <= i_hi; i0 += BR) {  // Alg 2 l.8
            __syncthreads();  // the previous tile's readers of Qs, dOs, Ps are done (and K/V loaded)
            load_rows<T, HS, C::LDH, BR, NT>(Qs, qp, i0, Tq);  // Alg 2 l.9
            load_rows<T, HS, C::LDH, BR, NT>(dOs, dop, i0, Tq);
            for (int r = threadIdx.x; r < BR; r += NT) {
                const bool real = i0 + r < Tq;
                lse_s[r] = real ? lse[(size_t)bh * Tq + i0 + r] : INFINITY;
                D_s[r] = real ? D[(size_t)bh * Tq + i0 + r] : 0.f;
            }
            __syncthreads();  // the tiles are complete

            // S = Q K^T (Alg 2 l.10): (BR/16) x (BC/16) output tiles spread over the warps.
            for (int t = warp; t < (BR / 16) * (BC / 16); t += C::WARPS) {
                const int rt = t / (BC / 16), ct = t % (BC / 16);
                FragC acc;
                wmma::fill_fragment(acc, 0.f);
#pragma unroll
                for (int d = 0; d < HS / 16; ++d) {
                    FragA<T> a;
                    FragBt<T> bt;
                    wmma::load_matrix_sync(a, Qs + 16 * rt * C::LDH + 16 * d, C::LDH);
                    wmma::load_matrix_sync(bt, Ks + 16 * ct * C::LDH + 16 * d, C::LDH);  // K^T
                    wmma::mma_sync(acc, a, bt, acc);
                }
                wmma::store_matrix_sync(Ss + 16 * rt * C::LDS + 16 * ct, acc, C::LDS, wmma::mem_row_major);
            }
            __syncthreads();  // all of S is in Ss

            // P = exp(S scale - lse) (Alg 2 l.11), 0 where the key is invisible or the row is padding.
            for (int idx = threadIdx.x; idx < BR * BC; idx += NT) {
                const int r = idx / BC, c = idx % BC;
                const bool vis = i0 + r < Tq && key_visible(off + i0 + r, j0 + c, Tk, causal, window);
                const float p = vis ? __expf(Ss[r * C::LDS + c] * scale - lse_s[r]) : 0.f;
                Ss[r * C::LDS + c] = p;
                Ps[r * C::LDP + c] = from_float<T>(p);
            }
            __syncthreads();  // P is complete

            // dV[:, own columns] += P^T dO (Alg 2 l.12); P^T is P read as a col_major A operand.
#pragma unroll
            for (int kr = 0; kr < 4; ++kr) {
#pragma unroll
                for (int rs = 0; rs < BR / 16; ++rs) {
                    FragAt<T> pt;
                    FragB<T> bo;
                    wmma::load_matrix_sync(pt, Ps + 16 * rs * C::LDP + 16 * kr, C::LDP);
                    wmma::load_matrix_sync(bo, dOs + 16 * rs * C::LDH + 16 * warp, C::LDH);
                    wmma::mma_sync(dV_acc[kr], pt, bo, dV_acc[kr]);
                }
            }
            // dP = dO V^T (Alg 2 l.13) -> dPs.
            for (int t = warp; t < (BR / 16) * (BC / 16); t += C::WARPS) {
                const int rt = t / (BC / 16), ct = t % (BC / 16);
                FragC acc;
                wmma::fill_fragment(acc, 0.f);
#pragma unroll
                for (int d = 0; d < HS / 16; ++d) {
                    FragA<T> a;
                    FragBt<T> bt;
                    wmma::load_matrix_sync(a, dOs + 16 * rt * C::LDH + 16 * d, C::LDH);
                    wmma::load_matrix_sync(bt, Vs + 16 * ct * C::LDH + 16 * d, C::LDH);  // V^T
                    wmma::mma_sync(acc, a, bt, acc);
                }
                wmma::store_matrix_sync(dPs + 16 * rt * C::LDS + 16 * ct, acc, C::LDS, wmma::mem_row_major);
            }
            __syncthreads();  // dP is complete and every warp is done reading P from Ps

            // dS = P * (dP - D) (Alg 2 l.14), overwriting Ps.
            for (int idx = threadIdx.x; idx < BR * BC; idx += NT) {
                const int r = idx / BC, c = idx % BC;
                const float ds = Ss[r * C::LDS + c] * (dPs[r * C::LDS + c] - D_s[r]);
                Ps[r * C::LDP + c] = from_float<T>(ds);
            }
            __syncthreads();  // dS is complete

            // dK[:, own columns] += dS^T Q (Alg 2 l.16); the scale is applied once at the end.
#pragma unroll
            for (int kr = 0; kr < 4; ++kr) {
#pragma unroll
                for (int rs = 0; rs < BR / 16; ++rs) {
                    FragAt<T> dst;
                    FragB<T> bq;
                    wmma::load_matrix_sync(dst, Ps + 16 * rs * C::LDP + 16 * kr, C::LDP);
                    wmma::load_matrix_sync(bq, Qs + 16 * rs * C::LDH + 16 * warp, C::LDH);
                    wmma::mma_sync(dK_acc[kr], dst, bq, dK_acc[kr]);
                }
            }
            // dQ += scale dS K (Alg 2 l.15): (BR/16) x (HS/16) tiles, each staged and added atomically
            // (other key blocks add to the same dQ rows concurrently).
            for (int t = warp; t < (BR / 16) * (HS / 16); t += C::WARPS) {
                const int rt = t / (HS / 16), n = t % (HS / 16);
                FragC acc;
                wmma::fill_fragment(acc, 0.f);
#pragma unroll
                for (int kc = 0; kc < BC / 16; ++kc) {
                    FragA<T> a;
                    FragB<T> bk;
                    wmma::load_matrix_sync(a, Ps + 16 * rt * C::LDP + 16 * kc, C::LDP);
                    wmma::load_matrix_sync(bk, Ks + 16 * kc * C::LDH + 16 * n, C::LDH);
                    wmma::mma_sync(acc, a, bk, acc);
                }
                wmma::store_matrix_sync(stage, acc, 16, wmma::mem_row_major);
                __syncwarp();  // the staged tile is complete before lanes read other lanes' elements
                for (int e = lane; e < 256; e += 32) {
                    const int i = i0 + 16 * rt + e / 16;
                    if (i < Tq)
                        atomicAdd(dq + ((size_t)bh * Tq + i) * HS + 16 * n + e % 16, scale * stage[e]);
                }
                __syncwarp();  // every lane has read the staging tile before the next store overwrites it
            }
        }
    }

    // Alg 2 l.18: write dK_j = scale dS^T Q and dV_j once, through the staging tile.
#pragma unroll
    for (int kr = 0; kr < 4; ++kr) {
        for (int which = 0; which < 2; ++which) {
            wmma::store_matrix_sync(stage, which ? dV_acc[kr] : dK_acc[kr], 16, wmma::mem_row_major);
            __syncwarp();
            T* dst = which ? dv : dk;
            const float mul = which ? 1.f : scale;
            for (int e = lane; e < 256; e += 32) {
                const int j = j0 + 16 * kr + e / 16;
                if (j < Tk)
                    dst[((size_t)bkv * Tk + j) * HS + 16 * warp + e % 16] = from_float<T>(mul * stage[e]);
            }
            __syncwarp();
        }
    }
}

// -----------------------------------------------------------------------------------------------
// 3. Weight-only quantized matmul, y (M, N) = x (M, K) W_hat^T, W_hat dequantized on the fly
//
// PyTorch reference (quant.py; QuantLinear.forward's fallback):  F.linear(x, dequantize(q).to(x.dtype))
//   int8  (quantize_int8):  q int8 (N, K), scale fp32 (N,):      W_hat[n, k] = q[n, k] * scale[n]
//   int4  (quantize_int4):  K padded to Kp = ng G; codes (N, Kp) in 0..15 packed in pairs (element 2i
//         in the low nibble of byte i, 2i+1 in the high one) -> uint8 (N Kp / 2); s fp16 (N, ng);
//         zero points z (N, ng) packed the same way -> uint8 (ceil(N ng / 2));
//         W_hat[n, k] = (code[n, k] - z[n, k / G]) * s[n, k / G].
//
// GEMV (M <= 8, decoding): memory-bound, so the job is to stream the packed weights once at full
// bandwidth. Grid ceil(N / 4), 4 warps; warp w computes output column n = 4 blockIdx.x + w for all M
// rows of x. Lane l reads 16-byte pieces l, l + 32, ... of row n (consecutive lanes, consecutive
// pieces: every load instruction of the warp is one contiguous 512-byte stretch). A piece holds 16
// int8 or 32 int4 weights; an int4 piece never straddles a group (G is a multiple of 32), so it
// needs one scale and one zero point:  acc_m += s * sum_t x[m, k+t] (code_t - z). x (at most 8 rows)
// comes through the L1/L2 caches. A warp reduction finishes each dot product.
// GEMM (M > 8): block tile 64 x 64 of y, 4 warps of 32 x 32 (2 x 2 WMMA accumulators); per 32-wide K
// step, x's tile and the *dequantized* weight tile (16-bit, like the reference's W_hat.to(x.dtype);
// for int8 the raw code, exact in 16 bits, with the per-row scale applied to the fp32 result) are
// staged in shared memory, then multiplied on the tensor cores.

constexpr int GEMV_WARPS = 4;
constexpr int GEMV_MAX_M = 8;
constexpr int GEMM_BM = 64, GEMM_BN = 64, GEMM_BK = 32;
constexpr int GEMM_THREADS = 128;

// x[m, k0 .. k0+7] as floats (0 beyond K); vectorised when the 8 values are 16-byte aligned.
template <typename T>
__device__ __forceinline__ void load_x8(const T* __restrict__ xrow, int k0, int K, bool xvec, float* out) {
    if (xvec && k0 + 8 <= K) {
        const uint4 u = __ldg(reinterpret_cast<const uint4*>(xrow + k0));
        const T* e = reinterpret_cast<const T*>(&u);
#pragma unroll
        for (int t = 0; t < 8; ++t) out[t] = to_float(e[t]);
    } else {
#pragma unroll
        for (int t = 0; t < 8; ++t) out[t] = k0 + t < K ? to_float(xrow[k0 + t]) : 0.f;
    }
}

__device__ __forceinline__ int nibble(const uint8_t* packed, size_t idx) {  // element idx of pack_pairs
    const uint8_t byte = packed[idx / 2];
    return (idx & 1) ? (byte >> 4) : (byte & 0x0F);
}

template <typename T, bool INT4>
__global__ void __launch_bounds__(32 * GEMV_WARPS)
quant_gemv_kernel(const T* __restrict__ x, const uint8_t* __restrict__ qw, const float* __restrict__ scale8,
                  const __half* __restrict__ s4, const uint8_t* __restrict__ z4, T* __restrict__ y,
                  int M, int N, int K, int G, int ng, int Kp, bool xvec, bool wvec) {
    // xvec: x's rows start 16-byte aligned (K % 8 == 0 and an aligned base); wvec: so do int8 rows.
    const int n = blockIdx.x * GEMV_WARPS + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (n >= N) return;  // a whole warp leaves together: the shuffles below stay full-warp
    constexpr int PER_PIECE = INT4 ? 32 : 16;  // weights per 16-byte piece
    const size_t row_bytes = INT4 ? (size_t)Kp / 2 : (size_t)K;
    const uint8_t* row = qw + (size_t)n * row_bytes;
    const int n_pieces = INT4 ? Kp / 32 : (K + 15) / 16;
    float acc[GEMV_MAX_M];
#pragma unroll
    for (int m = 0; m < GEMV_MAX_M; ++m) acc[m] = 0.f;

    for (int piece = lane; piece < n_pieces; piece += 32) {
        const int k0 = piece * PER_PIECE;
        union { uint4 vec; uint8_t b[16]; } bytes;  // the 16-byte piece
        if (INT4 || (wvec && k0 + 16 <= K)) {  // int4 rows are always aligned (Kp / 2 % 16 == 0)
            bytes.vec = __ldg(reinterpret_cast<const uint4*>(row + 16 * (size_t)piece));
        } else {  // int8 with K % 16 != 0 (or the tail): byte loads, zeros past the row's end
#pragma unroll
            for (int t = 0; t < 16; ++t) bytes.b[t] = k0 + t < K ? row[k0 + t] : 0;
        }
        float w[PER_PIECE];  // this piece's weights, dequantized up to the group scale
        float s = 1.f;
        if constexpr (INT4) {
            const int grp = k0 / G;  // the piece lies inside one group
            s = __half2float(s4[(size_t)n * ng + grp]);
            const float z = (float)nibble(z4, (size_t)n * ng + grp);
#pragma unroll
            for (int t = 0; t < 16; ++t) {  // byte t holds elements 2t (low) and 2t + 1 (high)
                w[2 * t] = (float)(bytes.b[t] & 0x0F) - z;
                w[2 * t + 1] = (float)(bytes.b[t] >> 4) - z;
            }
        } else {
#pragma unroll
            for (int t = 0; t < 16; ++t) w[t] = (float)(int8_t)bytes.b[t];
        }
#pragma unroll
        for (int m = 0; m < GEMV_MAX_M; ++m) {
            if (m >= M) break;
            float dot = 0.f;
#pragma unroll
            for (int c = 0; c < PER_PIECE; c += 8) {
                float xs[8];
                load_x8(x + (size_t)m * K, k0 + c, K, xvec, xs);  // x = 0 past K (int4 padding)
#pragma unroll
                for (int t = 0; t < 8; ++t) dot += xs[t] * w[c + t];
            }
            acc[m] += s * dot;  // int4: the group scale; int8: the row scale comes at the end
        }
    }
#pragma unroll
    for (int m = 0; m < GEMV_MAX_M; ++m) {
        if (m >= M) break;
        const float total = warp_sum(acc[m]);
        if (lane == 0) y[(size_t)m * N + n] = from_float<T>(INT4 ? total : total * scale8[n]);
    }
}

template <typename T, bool INT4>
__global__ void __launch_bounds__(GEMM_THREADS)
quant_gemm_kernel(const T* __restrict__ x, const uint8_t* __restrict__ qw, const float* __restrict__ scale8,
                  const __half* __restrict__ s4, const uint8_t* __restrict__ z4, T* __restrict__ y,
                  int M, int N, int K, int G, int ng, int Kp) {
    constexpr int LDT = GEMM_BK + 8;   // 16-bit tiles
    constexpr int LDC = GEMM_BN + 4;   // fp32 output tile
    __shared__ __align__(32) T Xs[GEMM_BM * LDT];     // (BM, BK): x[m0 + r, k0 + c]
    __shared__ __align__(32) T Ws[GEMM_BN * LDT];     // (BN, BK): W_hat[n0 + r, k0 + c]
    __shared__ __align__(32) float Cs[GEMM_BM * LDC];  // (BM, BN)
    const int m0 = blockIdx.y * GEMM_BM, n0 = blockIdx.x * GEMM_BN;
    const int warp = threadIdx.x / 32;
    const int wm = (warp / 2) * 32, wn = (warp % 2) * 32;  // this warp's 32 x 32 corner of the tile

    FragC acc[2][2];
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.f);

    for (int k0 = 0; k0 < K; k0 += GEMM_BK) {
        __syncthreads();  // every warp is done with the previous tiles
        for (int idx = threadIdx.x; idx < GEMM_BM * GEMM_BK; idx += GEMM_THREADS) {
            const int r = idx / GEMM_BK, c = idx % GEMM_BK, m = m0 + r, kk = k0 + c;
            Xs[r * LDT + c] = m < M && kk < K ? x[(size_t)m * K + kk] : from_float<T>(0.f);
        }
        for (int idx = threadIdx.x; idx < GEMM_BN * GEMM_BK; idx += GEMM_THREADS) {
            const int r = idx / GEMM_BK, c = idx % GEMM_BK, n = n0 + r, kk = k0 + c;
            float w = 0.f;  // zero past K and N: the padding contributes nothing
            if (n < N && kk < K) {
                if constexpr (INT4) {
                    const int grp = kk / G;
                    const float z = (float)nibble(z4, (size_t)n * ng + grp);
                    w = ((float)nibble(qw, (size_t)n * Kp + kk) - z) * __half2float(s4[(size_t)n * ng + grp]);
                } else {
                    w = (float)(int8_t)qw[(size_t)n * K + kk];  // the code; the scale comes at the end
                }
            }
            Ws[r * LDT + c] = from_float<T>(w);
        }
        __syncthreads();  // both tiles are complete
#pragma unroll
        for (int kk = 0; kk < GEMM_BK / 16; ++kk) {
            FragA<T> a[2];
            FragBt<T> bt[2];
#pragma unroll
            for (int i = 0; i < 2; ++i) wmma::load_matrix_sync(a[i], Xs + (wm + 16 * i) * LDT + 16 * kk, LDT);
#pragma unroll
            for (int j = 0; j < 2; ++j)  // W^T: the row-major (BN, BK) tile read as col_major
                wmma::load_matrix_sync(bt[j], Ws + (wn + 16 * j) * LDT + 16 * kk, LDT);
#pragma unroll
            for (int i = 0; i < 2; ++i)
#pragma unroll
                for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], a[i], bt[j], acc[i][j]);
        }
    }
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j)
            wmma::store_matrix_sync(Cs + (wm + 16 * i) * LDC + wn + 16 * j, acc[i][j], LDC,
                                    wmma::mem_row_major);
    __syncthreads();  // the whole output tile is in Cs
    for (int idx = threadIdx.x; idx < GEMM_BM * GEMM_BN; idx += GEMM_THREADS) {
        const int r = idx / GEMM_BN, c = idx % GEMM_BN, m = m0 + r, n = n0 + c;
        if (m < M && n < N)
            y[(size_t)m * N + n] = from_float<T>(INT4 ? Cs[r * LDC + c] : Cs[r * LDC + c] * scale8[n]);
    }
}

// -----------------------------------------------------------------------------------------------
// Host side: checks, launches, Python bindings

namespace {

void check_cuda_tensor(const at::Tensor& t, const char* name, const at::Device& device) {
    TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor, got one on ", t.device());
    TORCH_CHECK(t.device() == device, name, " is on ", t.device(), " but the other inputs are on ", device);
    TORCH_CHECK(t.is_contiguous(), name, " must be contiguous (call .contiguous() first)");
}

bool is_aligned16(const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; }

void check_aligned16(const at::Tensor& t, const char* name) {
    TORCH_CHECK(is_aligned16(t), name,
                " must start at a 16-byte aligned address (a contiguous copy of it will)");
}

bool is_half_or_bf16(const at::Tensor& t) {
    return t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16;
}

template <typename Kernel>
void allow_smem(Kernel kernel, size_t bytes) {  // opt in to more than 48 KiB of dynamic shared memory
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bytes));
}

struct AttnShape {
    int64_t B, nh, nkv, Tq, Tk, hs;
};

AttnShape check_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t window) {
    TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4,
                "expected q (B, nh, Tq, hs) and k, v (B, nkv, Tk, hs); got ", q.sizes(), ", ", k.sizes(),
                ", ", v.sizes());
    const auto device = q.device();
    check_cuda_tensor(q, "q", device);
    check_cuda_tensor(k, "k", device);
    check_cuda_tensor(v, "v", device);
    TORCH_CHECK(is_half_or_bf16(q), "q must be float16 or bfloat16, got ", q.scalar_type());
    TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
                "q, k, v must share one dtype; got ", q.scalar_type(), ", ", k.scalar_type(), ", ",
                v.scalar_type());
    AttnShape s{q.size(0), q.size(1), k.size(1), q.size(2), k.size(2), q.size(3)};
    TORCH_CHECK(s.hs == 64 || s.hs == 128, "head size must be 64 or 128, got ", s.hs);
    TORCH_CHECK(k.size(0) == s.B && k.size(3) == s.hs && v.sizes() == k.sizes(),
                "k, v ", k.sizes(), ", ", v.sizes(), " do not fit q ", q.sizes(),
                ": need the same B and hs, and v.shape == k.shape");
    TORCH_CHECK(s.nkv > 0 && s.nh % s.nkv == 0, "nh (", s.nh, ") must be a multiple of nkv (", s.nkv, ")");
    TORCH_CHECK(s.Tq > 0 && s.Tk > 0 && s.B > 0, "empty inputs: B, Tq and Tk must be >= 1");
    TORCH_CHECK(s.Tq < (1LL << 30) && s.Tk < (1LL << 30), "sequences longer than 2^30 are not supported");
    TORCH_CHECK(window >= 0 && window < (1LL << 30), "window must be in [0, 2^30), got ", window);
    TORCH_CHECK(s.B * s.nh <= 65535, "B * nh must be <= 65535 (grid limit), got ", s.B * s.nh);
    check_aligned16(q, "q");
    check_aligned16(k, "k");
    check_aligned16(v, "v");
    return s;
}

std::optional<at::Tensor> check_sinks(const std::optional<at::Tensor>& sinks, const AttnShape& s,
                                      const at::Device& device) {
    if (!sinks.has_value()) return std::nullopt;
    const at::Tensor& t = *sinks;
    TORCH_CHECK(t.dim() == 1 && t.size(0) == s.nh, "sinks must have shape (", s.nh, ",), got ", t.sizes());
    TORCH_CHECK(t.is_cuda() && t.device() == device, "sinks must be on ", device, ", got ", t.device());
    TORCH_CHECK(t.is_floating_point(), "sinks must be a floating-point tensor, got ", t.scalar_type());
    return t.to(at::kFloat).contiguous();
}

template <typename T, int HS>
void launch_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const float* sinks,
                at::Tensor& o, at::Tensor& lse, const AttnShape& s, bool causal, int window) {
    auto kernel = flash_fwd_kernel<T, HS>;
    const size_t smem = FwdSmem<HS>::BYTES;
    allow_smem(kernel, smem);
    const dim3 grid((unsigned)((s.Tq + FWD_BR - 1) / FWD_BR), (unsigned)(s.B * s.nh));
    kernel<<<grid, FWD_THREADS, smem, c10::cuda::getCurrentCUDAStream()>>>(
        reinterpret_cast<const T*>(q.data_ptr()), reinterpret_cast<const T*>(k.data_ptr()),
        reinterpret_cast<const T*>(v.data_ptr()), sinks, reinterpret_cast<T*>(o.data_ptr()),
        lse.data_ptr<float>(), (int)s.nh, (int)s.nkv, (int)s.Tq, (int)s.Tk, causal, window,
        (float)(1.0 / std::sqrt((double)s.hs)));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

// flash_attn_fwd(q, k, v, sinks, causal, window) -> (o (B, nh, Tq, hs) in q's dtype, lse (B, nh, Tq) fp32)
std::tuple<at::Tensor, at::Tensor> flash_attn_fwd(const at::Tensor& q, const at::Tensor& k,
                                                  const at::Tensor& v, const std::optional<at::Tensor>& sinks,
                                                  bool causal, int64_t window) {
    const AttnShape s = check_attention(q, k, v, window);
    const c10::cuda::CUDAGuard guard(q.device());
    const auto sinks32 = check_sinks(sinks, s, q.device());
    const float* sp = sinks32 ? sinks32->data_ptr<float>() : nullptr;
    at::Tensor o = at::empty_like(q);
    at::Tensor lse = at::empty({s.B, s.nh, s.Tq}, q.options().dtype(at::kFloat));
    const bool f16 = q.scalar_type() == at::kHalf;
    if (s.hs == 64) {
        if (f16) launch_fwd<__half, 64>(q, k, v, sp, o, lse, s, causal, (int)window);
        else launch_fwd<__nv_bfloat16, 64>(q, k, v, sp, o, lse, s, causal, (int)window);
    } else {
        if (f16) launch_fwd<__half, 128>(q, k, v, sp, o, lse, s, causal, (int)window);
        else launch_fwd<__nv_bfloat16, 128>(q, k, v, sp, o, lse, s, causal, (int)window);
    }
    return {o, lse};
}

namespace {

template <typename T, int HS>
void launch_bwd(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                const at::Tensor& o, const at::Tensor& lse, at::Tensor& D, at::Tensor& dq32, at::Tensor& dk,
                at::Tensor& dv, const AttnShape& s, bool causal, int window) {
    const auto stream = c10::cuda::getCurrentCUDAStream();
    const int rows = (int)(s.B * s.nh * s.Tq);
    constexpr int DOT_WARPS = 8;
    flash_bwd_dot_kernel<T, HS><<<(rows + DOT_WARPS - 1) / DOT_WARPS, 32 * DOT_WARPS, 0, stream>>>(
        reinterpret_cast<const T*>(dout.data_ptr()), reinterpret_cast<const T*>(o.data_ptr()),
        D.data_ptr<float>(), rows);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    using C = BwdCfg<HS>;
    auto kernel = flash_bwd_kernel<T, HS>;
    allow_smem(kernel, C::BYTES);
    const dim3 grid((unsigned)((s.Tk + C::BC - 1) / C::BC), (unsigned)(s.B * s.nkv));
    kernel<<<grid, C::THREADS, C::BYTES, stream>>>(
        reinterpret_cast<const T*>(q.data_ptr()), reinterpret_cast<const T*>(k.data_ptr()),
        reinterpret_cast<const T*>(v.data_ptr()), reinterpret_cast<const T*>(dout.data_ptr()),
        lse.data_ptr<float>(), D.data_ptr<float>(), dq32.data_ptr<float>(),
        reinterpret_cast<T*>(dk.data_ptr()), reinterpret_cast<T*>(dv.data_ptr()), (int)s.nh, (int)s.nkv,
        (int)s.Tq, (int)s.Tk, causal, window, (float)(1.0 / std::sqrt((double)s.hs)));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

// flash_attn_bwd(do, q, k, v, o, lse, sinks, causal, window) -> (dq, dk, dv, dsinks or None)
std::tuple<at::Tensor, at::Tensor, at::Tensor, std::optional<at::Tensor>> flash_attn_bwd(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& o, const at::Tensor& lse, const std::optional<at::Tensor>& sinks, bool causal,
    int64_t window) {
    const AttnShape s = check_attention(q, k, v, window);
    check_cuda_tensor(dout, "do", q.device());
    check_cuda_tensor(o, "o", q.device());
    check_cuda_tensor(lse, "lse", q.device());
    TORCH_CHECK(dout.sizes() == q.sizes() && o.sizes() == q.sizes(), "do ", dout.sizes(), " and o ",
                o.sizes(), " must have q's shape ", q.sizes());
    TORCH_CHECK(dout.scalar_type() == q.scalar_type() && o.scalar_type() == q.scalar_type(),
                "do and o must have q's dtype ", q.scalar_type());
    TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.dim() == 3 && lse.size(0) == s.B &&
                    lse.size(1) == s.nh && lse.size(2) == s.Tq,
                "lse must be the float32 (B, nh, Tq) tensor returned by flash_attn_fwd, got ",
                lse.scalar_type(), " ", lse.sizes());
    TORCH_CHECK(s.B * s.nkv <= 65535, "B * nkv must be <= 65535 (grid limit)");
    const c10::cuda::CUDAGuard guard(q.device());
    const auto sinks32 = check_sinks(sinks, s, q.device());
    at::Tensor D = at::empty({s.B, s.nh, s.Tq}, lse.options());          // rowsum(dO * O)
    at::Tensor dq32 = at::zeros({s.B, s.nh, s.Tq, s.hs}, lse.options());  // atomicAdd target
    at::Tensor dk = at::empty_like(k), dv = at::empty_like(v);
    const bool f16 = q.scalar_type() == at::kHalf;
    if (s.hs == 64) {
        if (f16) launch_bwd<__half, 64>(dout, q, k, v, o, lse, D, dq32, dk, dv, s, causal, (int)window);
        else launch_bwd<__nv_bfloat16, 64>(dout, q, k, v, o, lse, D, dq32, dk, dv, s, causal, (int)window);
    } else {
        if (f16) launch_bwd<__half, 128>(dout, q, k, v, o, lse, D, dq32, dk, dv, s, causal, (int)window);
        else launch_bwd<__nv_bfloat16, 128>(dout, q, k, v, o, lse, D, dq32, dk, dv, s, causal, (int)window);
    }
    std::optional<at::Tensor> dsinks;
    if (sinks32) {  // d loss / d s_h = -sum_rows exp(s_h - lse) D (attention_flash.py, "Sink gradient")
        const at::Tensor p_sink = at::exp(sinks32->view({1, s.nh, 1}) - lse);  // (B, nh, Tq)
        dsinks = (-(p_sink * D).sum(c10::IntArrayRef{0, 2})).to(sinks->scalar_type());  // (nh,)
    }
    return {dq32.to(q.scalar_type()), dk, dv, dsinks};
}

// quant_linear(x, scheme, *buffers): buffers in QuantLinear.names order (sorted buffer names):
//   "int8":                      q int8 (N, K), scale fp32 (N,)
//   "int4_g<G>" / "awq_g<G>":    q uint8 (N Kp / 2), s fp16 (N, ng), z uint8 (ceil(N ng / 2))
// x (..., K) float16 / bfloat16 -> y (..., N) in x's dtype (no bias: the caller adds it).
at::Tensor quant_linear(const at::Tensor& x, const std::string& scheme, const std::vector<at::Tensor>& bufs) {
    const bool int4 = scheme.rfind("int4_g", 0) == 0 || scheme.rfind("awq_g", 0) == 0;
    TORCH_CHECK(scheme == "int8" || int4, "llm_kernels.quant_linear supports the schemes int8, int4_g<G> and "
                "awq_g<G>, not ", scheme, " (QuantLinear falls back to PyTorch for the others)");
    TORCH_CHECK(x.dim() >= 1 && x.size(-1) > 0, "x must have shape (..., K) with K >= 1, got ", x.sizes());
    const auto device = x.device();
    check_cuda_tensor(x, "x", device);
    TORCH_CHECK(is_half_or_bf16(x), "x must be float16 or bfloat16, got ", x.scalar_type());
    const int64_t K = x.size(-1), M = x.numel() / K;
    TORCH_CHECK(bufs.size() == (int4 ? 3u : 2u), "scheme ", scheme, " takes ", int4 ? 3 : 2,
                " buffers (", int4 ? "q, s, z" : "q, scale", "), got ", bufs.size());
    const at::Tensor& qw = bufs[0];
    check_cuda_tensor(qw, "q", device);
    int64_t N = 0, G = 1, ng = 1, Kp = K;
    const float* scale8 = nullptr;
    const __half* s4 = nullptr;
    const uint8_t* z4 = nullptr;
    if (!int4) {
        const at::Tensor& scale = bufs[1];
        check_cuda_tensor(scale, "scale", device);
        TORCH_CHECK(qw.scalar_type() == at::kChar && qw.dim() == 2 && qw.size(1) == K,
                    "int8: q must be int8 (N, K) with K = x.shape[-1] = ", K, ", got ", qw.scalar_type(), " ",
                    qw.sizes());
        N = qw.size(0);
        TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.dim() == 1 && scale.size(0) == N,
                    "int8: scale must be float32 (", N, ",), got ", scale.scalar_type(), " ", scale.sizes());
        scale8 = scale.data_ptr<float>();
    } else {
        const at::Tensor &s = bufs[1], &z = bufs[2];
        check_cuda_tensor(s, "s", device);
        check_cuda_tensor(z, "z", device);
        const std::string digits = scheme.substr(scheme.find("_g") + 2);
        TORCH_CHECK(!digits.empty() && digits.size() <= 6 &&
                        digits.find_first_not_of("0123456789") == std::string::npos,
                    "cannot read the group size from scheme ", scheme);
        G = std::stoll(digits);
        TORCH_CHECK(G > 0 && G % 32 == 0, "group size must be a multiple of 32, got ", G);
        TORCH_CHECK(s.scalar_type() == at::kHalf && s.dim() == 2, "int4: s must be float16 (N, ng), got ",
                    s.scalar_type(), " ", s.sizes());
        N = s.size(0);
        ng = s.size(1);
        Kp = ng * G;
        TORCH_CHECK(ng == (K + G - 1) / G, "int4: s has ", ng, " groups per row, but K = ", K, " and G = ", G,
                    " need ", (K + G - 1) / G);
        TORCH_CHECK(qw.scalar_type() == at::kByte && qw.numel() == N * Kp / 2,
                    "int4: q must be uint8 with N * Kp / 2 = ", N * Kp / 2, " bytes, got ", qw.scalar_type(),
                    " with ", qw.numel());
        TORCH_CHECK(z.scalar_type() == at::kByte && z.numel() == (N * ng + 1) / 2,
                    "int4: z must be uint8 with ceil(N * ng / 2) = ", (N * ng + 1) / 2, " bytes, got ",
                    z.scalar_type(), " with ", z.numel());
        check_aligned16(qw, "q");  // the int4 GEMV always reads 16-byte pieces
        s4 = reinterpret_cast<const __half*>(s.data_ptr());
        z4 = z.data_ptr<uint8_t>();
    }
    TORCH_CHECK(N > 0 && N < (1LL << 31) && Kp < (1LL << 31) && M < (1LL << 31),
                "sizes out of range: M = ", M, ", N = ", N, ", K = ", K);
    const c10::cuda::CUDAGuard guard(device);
    std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
    out_shape.back() = N;
    at::Tensor y = at::empty(out_shape, x.options());
    if (M == 0) return y;
    const auto stream = c10::cuda::getCurrentCUDAStream();
    const uint8_t* qp = reinterpret_cast<const uint8_t*>(qw.data_ptr());
    const int iM = (int)M, iN = (int)N, iK = (int)K, iG = (int)G, ing = (int)ng, iKp = (int)Kp;
    const bool xvec = K % 8 == 0 && is_aligned16(x), wvec = K % 16 == 0 && is_aligned16(qw);
    auto run = [&](auto type_tag, auto int4_tag) {
        using T = decltype(type_tag);
        constexpr bool I4 = decltype(int4_tag)::value;
        const T* xp = reinterpret_cast<const T*>(x.data_ptr());
        T* yp = reinterpret_cast<T*>(y.data_ptr());
        if (M <= GEMV_MAX_M) {
            const unsigned blocks = (unsigned)((N + GEMV_WARPS - 1) / GEMV_WARPS);
            quant_gemv_kernel<T, I4><<<blocks, 32 * GEMV_WARPS, 0, stream>>>(
                xp, qp, scale8, s4, z4, yp, iM, iN, iK, iG, ing, iKp, xvec, wvec);
        } else {
            TORCH_CHECK((M + GEMM_BM - 1) / GEMM_BM <= 65535, "M = ", M, " is too large for one launch");
            const dim3 grid((unsigned)((N + GEMM_BN - 1) / GEMM_BN), (unsigned)((M + GEMM_BM - 1) / GEMM_BM));
            quant_gemm_kernel<T, I4><<<grid, GEMM_THREADS, 0, stream>>>(
                xp, qp, scale8, s4, z4, yp, iM, iN, iK, iG, ing, iKp);
        }
        C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    const bool f16 = x.scalar_type() == at::kHalf;
    if (int4) {
        if (f16) run(__half(), std::true_type());
        else run(__nv_bfloat16(), std::true_type());
    } else {
        if (f16) run(__half(), std::false_type());
        else run(__nv_bfloat16(), std::false_type());
    }
    return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.doc() = "Fused flash attention and weight-only quantized matmul (kernels.cu)";
    m.def("flash_attn_fwd", &flash_attn_fwd, "FlashAttention-2 forward -> (o, lse)", py::arg("q"),
          py::arg("k"), py::arg("v"), py::arg("sinks"), py::arg("causal"), py::arg("window"));
    m.def("flash_attn_bwd", &flash_attn_bwd, "FlashAttention-2 backward -> (dq, dk, dv, dsinks)",
          py::arg("do"), py::arg("q"), py::arg("k"), py::arg("v"), py::arg("o"), py::arg("lse"),
          py::arg("sinks"), py::arg("causal"), py::arg("window"));
    m.def(
        "quant_linear",
        [](const at::Tensor& x, const std::string& scheme, py::args buffers) {
            std::vector<at::Tensor> bufs;
            for (const auto& b : buffers) bufs.push_back(b.cast<at::Tensor>());
            return quant_linear(x, scheme, bufs);
        },
        "y = x W_hat^T with W_hat dequantized inside the kernel; quant_linear(x, scheme, *buffers)");
    m.attr("QUANT_SCHEMES") = py::make_tuple("int8", "int4_g32", "int4_g64", "int4_g128", "awq_g32",
                                             "awq_g64", "awq_g128");
    m.attr("HEAD_SIZES") = py::make_tuple(64, 128);
}
