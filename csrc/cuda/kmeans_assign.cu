// The assignment step of the GPU k-means (see kmeans_update.h). A first kernel splits each centroid's unit
// direction into two 16-bit terms and computes its bias; then a block takes rows of one batch, holds them as
// mma A fragments in registers, and walks the batch's centroids in shared-memory tiles of kTile; each
// mma.m16n8k16 scores 16 rows against 8 centroids and every lane keeps the running best of the 4 scores it holds,
// so the [L, C] score matrix never leaves the registers. As in the tensor-core ranking kernel, lane (g, t) feeds A
// and B from one 16-byte chunk (4 j + t) of its rows and centroid: the order of k inside an mma is free as long as
// A and B agree.
#include "kmeans_update.h"

namespace kvstore {
namespace cluster {

namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kTile = 64;  // centroids a shared-memory tile

// Bytes of one centroid row in shared memory: rows g and g + 1 of a quarter warp's 16-byte loads fall in
// opposite halves of the banks.
__host__ __device__ constexpr int row_bytes(int D) { return D * 2 + 64; }
__host__ __device__ constexpr int rows_per_warp(int D) { return D <= 128 ? 32 : 16; }
template <int D>
constexpr size_t assign_smem() { return static_cast<size_t>(2 * kTile) * row_bytes(D) + kTile * sizeof(float); }

// Whether (v, i) ranks before (w, j): the larger score, the lower id among equals.
__device__ __forceinline__ bool better(float v, int i, float w, int j) { return v > w || (v == w && i < j); }

__device__ __forceinline__ double warp_sum_f64(double v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
    return v;
}

template <typename T>
__device__ __forceinline__ T to_16(float f) {
    if constexpr (std::is_same<T, __nv_bfloat16>::value) return __float2bfloat16_rn(f);
    else return __float2half_rn(f);
}

// A warp a centroid row: its unit direction u = c / |c| (f64, rounded to f32) as hi + lo of T, and the bias
// mu . u (f64): the numbers of split_directions and the bias in kvstore/gpu/kmeans.py.
template <typename T>
__global__ void __launch_bounds__(kThreads)
split_kernel(const float* __restrict__ cen, const float* __restrict__ mu, const int* __restrict__ ncent, long long B,
             int C, int D, T* __restrict__ terms, float* __restrict__ bias) {
    const long long row = static_cast<long long>(blockIdx.x) * kWarps + threadIdx.x / 32;
    if (row >= B * C) return;
    const int lane = threadIdx.x % 32;
    const long long b = row / C, c = row % C;
    const float* src = cen + row * D;
    const float* m = mu + b * D;
    T* hi = terms + (b * 2 * C + c) * D;
    T* lo = hi + static_cast<long long>(C) * D;
    if (ncent != nullptr && c >= ncent[b]) {  // not a centroid of this batch: never the best
        for (int i = lane; i < D; i += 32) hi[i] = lo[i] = to_16<T>(0.0f);
        if (lane == 0) bias[row] = INFINITY;
        return;
    }
    double ss = 0.0;
    for (int i = lane; i < D; i += 32) ss += static_cast<double>(src[i]) * src[i];
    const double nrm = fmax(sqrt(warp_sum_f64(ss)), 1e-300);
    double bs = 0.0;
    for (int i = lane; i < D; i += 32) {
        const float u = static_cast<float>(static_cast<double>(src[i]) / nrm);
        const T h = to_16<T>(u);
        hi[i] = h;
        lo[i] = to_16<T>(u - to_float(h));
        bs += static_cast<double>(u) * m[i];
    }
    bs = warp_sum_f64(bs);
    if (lane == 0) bias[row] = static_cast<float>(bs);
}

// NT: the terms of the directions used, 2 (hi + lo: f32 precision) or 1 (hi only: the 16-bit direction).
template <typename T, int D, int NT>
__global__ void __launch_bounds__(kThreads, 2)
assign_kernel(const T* __restrict__ x, const T* __restrict__ terms, const float* __restrict__ bias, long long L,
              int C, long long blocks_per_batch, float* __restrict__ best, std::int64_t* __restrict__ arg) {
    constexpr int NJ = D / 32;                 // chunks a lane holds of a row: 4 lanes x 8 elements each
    constexpr int MT = rows_per_warp(D) / 16;  // m16 tiles a warp
    constexpr int RB = row_bytes(D);
    extern __shared__ uint4 smem_raw[];
    unsigned char* tile = reinterpret_cast<unsigned char*>(smem_raw);      // [2 terms][kTile][RB]
    float* tbias = reinterpret_cast<float*>(tile + 2 * kTile * RB);       // [kTile]

    const long long b = blockIdx.x / blocks_per_batch;
    const long long row0 = (blockIdx.x % blocks_per_batch) * (kWarps * rows_per_warp(D));
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const int gr = lane / 4, t = lane % 4;
    const T* xb = x + b * L * D;
    const T* cb = terms + b * 2 * static_cast<long long>(C) * D;
    const float* bb = bias + b * C;

    uint4 ra[MT][NJ], rb[MT][NJ];  // rows gr and gr + 8 of each m16 tile
    const long long wrow = row0 + static_cast<long long>(warp) * rows_per_warp(D);
#pragma unroll
    for (int m = 0; m < MT; ++m) {
        const long long r1 = wrow + 16 * m + gr, r2 = r1 + 8;
#pragma unroll
        for (int j = 0; j < NJ; ++j) {
            ra[m][j] = r1 < L ? __ldg(reinterpret_cast<const uint4*>(xb + r1 * D + (4 * j + t) * 8))
                              : make_uint4(0u, 0u, 0u, 0u);
            rb[m][j] = r2 < L ? __ldg(reinterpret_cast<const uint4*>(xb + r2 * D + (4 * j + t) * 8))
                              : make_uint4(0u, 0u, 0u, 0u);
        }
    }
    float bv[MT][2];
    int bi[MT][2];
#pragma unroll
    for (int m = 0; m < MT; ++m) {
        bv[m][0] = bv[m][1] = -INFINITY;
        bi[m][0] = bi[m][1] = 0;
    }

    for (int c0 = 0; c0 < C; c0 += kTile) {
        const int nc = min(kTile, C - c0);
        __syncthreads();  // the previous tile is no longer read
        constexpr int kChunksRow = D / 8;
        for (int i = threadIdx.x; i < NT * kTile * kChunksRow; i += kThreads) {
            const int term = i / (kTile * kChunksRow), r = (i / kChunksRow) % kTile, ch = i % kChunksRow;
            uint4 v = make_uint4(0u, 0u, 0u, 0u);
            if (r < nc)
                v = __ldg(reinterpret_cast<const uint4*>(cb + (static_cast<long long>(term) * C + c0 + r) * D + ch * 8));
            *reinterpret_cast<uint4*>(tile + (term * kTile + r) * RB + ch * 16) = v;
        }
        for (int i = threadIdx.x; i < kTile; i += kThreads) tbias[i] = i < nc ? bb[c0 + i] : INFINITY;
        __syncthreads();
        for (int n0 = 0; n0 < nc; n0 += 8) {
            float acc[MT][4];
#pragma unroll
            for (int m = 0; m < MT; ++m) acc[m][0] = acc[m][1] = acc[m][2] = acc[m][3] = 0.0f;
#pragma unroll
            for (int term = 0; term < NT; ++term) {
                const unsigned char* crow = tile + (term * kTile + n0 + gr) * RB;
#pragma unroll
                for (int j = 0; j < NJ; ++j) {
                    const uint4 w = *reinterpret_cast<const uint4*>(crow + (4 * j + t) * 16);
#pragma unroll
                    for (int m = 0; m < MT; ++m) {
                        const unsigned a0[4] = {ra[m][j].x, rb[m][j].x, ra[m][j].y, rb[m][j].y};
                        mma_16816<T>(acc[m], a0, w.x, w.y);
                        const unsigned a1[4] = {ra[m][j].z, rb[m][j].z, ra[m][j].w, rb[m][j].w};
                        mma_16816<T>(acc[m], a1, w.z, w.w);
                    }
                }
            }
            // lane (g, t) holds rows g, g + 8 against centroids n0 + 2 t, n0 + 2 t + 1
            const float b0 = tbias[n0 + 2 * t], b1 = tbias[n0 + 2 * t + 1];
            const int id = c0 + n0 + 2 * t;
#pragma unroll
            for (int m = 0; m < MT; ++m) {
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    const float s0 = acc[m][2 * h] - b0, s1 = acc[m][2 * h + 1] - b1;
                    if (s0 > bv[m][h]) {  // ids grow within a lane: strict > keeps the first maximum
                        bv[m][h] = s0;
                        bi[m][h] = id;
                    }
                    if (s1 > bv[m][h]) {
                        bv[m][h] = s1;
                        bi[m][h] = id + 1;
                    }
                }
            }
        }
    }
    // the four lanes of a row hold interleaved ids: merge them by (score, lowest id)
#pragma unroll
    for (int m = 0; m < MT; ++m) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
#pragma unroll
            for (int o = 1; o < 4; o <<= 1) {
                const float w = __shfl_xor_sync(kFullMask, bv[m][h], o);
                const int j = __shfl_xor_sync(kFullMask, bi[m][h], o);
                if (better(w, j, bv[m][h], bi[m][h])) {
                    bv[m][h] = w;
                    bi[m][h] = j;
                }
            }
            const long long r = wrow + 16 * m + 8 * h + gr;
            if (t == 0 && r < L) {
                best[b * L + r] = bv[m][h];
                arg[b * L + r] = bi[m][h];
            }
        }
    }
}

template <typename T, int D, int NT>
cudaError_t launch_assign(const void* x, const void* terms, const float* bias, long long B, long long L, int C,
                          long long per, float* best, std::int64_t* arg, cudaStream_t stream) {
    constexpr size_t smem = assign_smem<D>();
    const cudaError_t e = cudaFuncSetAttribute(assign_kernel<T, D, NT>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                               static_cast<int>(smem));  // per device: set at every launch
    if (e != cudaSuccess) return e;
    assign_kernel<T, D, NT><<<static_cast<unsigned>(B * per), kThreads, smem, stream>>>(
        static_cast<const T*>(x), static_cast<const T*>(terms), bias, L, C, per, best, arg);
    return cudaGetLastError();
}

template <typename T, int D>
cudaError_t launch(const void* x, const float* cen, const float* mu, const int* ncent, long long B, long long L, int C,
                   int nterms, void* terms, float* bias, float* best, std::int64_t* arg, cudaStream_t stream) {
    const long long split_blocks = (B * C + kWarps - 1) / kWarps;
    const long long per = (L + kWarps * rows_per_warp(D) - 1) / (kWarps * rows_per_warp(D));
    if (split_blocks > 0x7fffffffLL || B * per > 0x7fffffffLL) return cudaErrorInvalidValue;
    split_kernel<T><<<static_cast<unsigned>(split_blocks), kThreads, 0, stream>>>(cen, mu, ncent, B, C, D,
                                                                                  static_cast<T*>(terms), bias);
    return nterms == 1 ? launch_assign<T, D, 1>(x, terms, bias, B, L, C, per, best, arg, stream)
                       : launch_assign<T, D, 2>(x, terms, bias, B, L, C, per, best, arg, stream);
}

template <typename T>
cudaError_t launch_d(const void* x, const float* cen, const float* mu, const int* ncent, long long B, long long L,
                     int C, int D, int nterms, void* terms, float* bias, float* best, std::int64_t* arg,
                     cudaStream_t stream) {
    switch (D) {
        case 64:
            return launch<T, 64>(x, cen, mu, ncent, B, L, C, nterms, terms, bias, best, arg, stream);
        case 128:
            return launch<T, 128>(x, cen, mu, ncent, B, L, C, nterms, terms, bias, best, arg, stream);
        case 256:
            return launch<T, 256>(x, cen, mu, ncent, B, L, C, nterms, terms, bias, best, arg, stream);
        default:
            return cudaErrorInvalidValue;
    }
}

}  // namespace

bool kmeans_assign_supported(DType dtype, int D) {
    if ((dtype != DType::BF16 && dtype != DType::F16) || (D != 64 && D != 128 && D != 256)) return false;
    int dev = 0, major = 0;
    if (cudaGetDevice(&dev) != cudaSuccess) return false;
    if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess) return false;
    cudaFuncAttributes attr;
    if (cudaFuncGetAttributes(&attr, assign_kernel<__nv_bfloat16, 128, 2>) != cudaSuccess) return false;
    return major >= 8 && attr.ptxVersion >= 80;
}

cudaError_t kmeans_assign_launch(const void* x, const float* cen, const float* mu, const int* ncent, DType dtype,
                                 long long B, long long L, int C, int D, int nterms, void* terms, float* bias,
                                 float* best, std::int64_t* arg, cudaStream_t stream) {
    if (B < 0 || L < 0 || C < 1 || (nterms != 1 && nterms != 2) || !kmeans_assign_supported(dtype, D) ||
        !is_aligned(x, 16))
        return cudaErrorInvalidValue;
    if (B == 0 || L == 0) return cudaSuccess;
    if (dtype == DType::BF16)
        return launch_d<__nv_bfloat16>(x, cen, mu, ncent, B, L, C, D, nterms, terms, bias, best, arg, stream);
    return launch_d<__half>(x, cen, mu, ncent, B, L, C, D, nterms, terms, bias, best, arg, stream);
}

}  // namespace cluster
}  // namespace kvstore
