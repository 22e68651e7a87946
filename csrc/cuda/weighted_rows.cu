// Weighted row sums (see weighted_rows.h). A block takes kChunk consecutive rows of one slot; its threads form
// 256 / tpr row lanes of tpr threads (tpr: Dv rounded up to a warp), thread c of a row lane holding channel c.
// Each row lane walks its rows (reads its values once per pass of kHb heads: one pass when Hg <= kHb), the lanes'
// sums are reduced in shared memory and added to the output with one atomic per head and channel.
#include "weighted_rows.h"

namespace kvstore {
namespace cluster {

namespace {

constexpr int kThreads = 256;
constexpr int kChunk = 256;  // rows a block

struct WeightedArgs {
    const float* w;
    const std::int64_t* rows;
    const void* values;
    int G, Hg, Dv, tpr;
    long long t, R;
    float* out;
};

template <typename T, int kHb>
__global__ void __launch_bounds__(kThreads) weighted_rows_kernel(const WeightedArgs a) {
    extern __shared__ float red[];  // [lanes, kHb, tpr]
    const int tpr = a.tpr, lanes = kThreads / tpr;
    const int lane = threadIdx.x / tpr, c = threadIdx.x % tpr;
    const long long g = blockIdx.y;
    const long long i0 = static_cast<long long>(blockIdx.x) * kChunk;
    const long long i1 = min(i0 + kChunk, a.t);
    const float* wg = a.w + g * a.Hg * a.t;
    const std::int64_t* rg = a.rows + g * a.t;
    const T* vals = static_cast<const T*>(a.values);
    const bool active = lane < lanes && c < a.Dv;
    for (int h0 = 0; h0 < a.Hg; h0 += kHb) {
        float acc[kHb];
#pragma unroll
        for (int hh = 0; hh < kHb; ++hh) acc[hh] = 0.f;
        if (active) {
            for (long long i = i0 + lane; i < i1; i += lanes) {
                const long long row = rg[i];
                if (row < 0 || row >= a.R) continue;
                const float v = to_float(vals[row * a.Dv + c]);
#pragma unroll
                for (int hh = 0; hh < kHb; ++hh) {
                    if (h0 + hh < a.Hg) acc[hh] += wg[(h0 + hh) * a.t + i] * v;
                }
            }
        }
        if (lanes > 1) {
            if (lane < lanes) {
#pragma unroll
                for (int hh = 0; hh < kHb; ++hh) red[(lane * kHb + hh) * tpr + c] = acc[hh];
            }
            __syncthreads();
            if (lane == 0) {
                for (int l = 1; l < lanes; ++l) {
#pragma unroll
                    for (int hh = 0; hh < kHb; ++hh) acc[hh] += red[(l * kHb + hh) * tpr + c];
                }
            }
            __syncthreads();
        }
        if (lane == 0 && c < a.Dv) {
#pragma unroll
            for (int hh = 0; hh < kHb; ++hh) {
                if (h0 + hh < a.Hg) atomicAdd(a.out + (g * a.Hg + h0 + hh) * a.Dv + c, acc[hh]);
            }
        }
    }
}

template <typename T, int kHb>
cudaError_t launch_typed(const WeightedArgs& a, cudaStream_t stream) {
    const dim3 grid(static_cast<unsigned>((a.t + kChunk - 1) / kChunk), static_cast<unsigned>(a.G));
    const size_t smem = static_cast<size_t>(kThreads / a.tpr) * kHb * a.tpr * sizeof(float);
    weighted_rows_kernel<T, kHb><<<grid, kThreads, smem, stream>>>(a);
    return cudaGetLastError();
}

template <typename T>
cudaError_t launch_heads(const WeightedArgs& a, cudaStream_t stream) {
    if (a.Hg <= 1) return launch_typed<T, 1>(a, stream);
    if (a.Hg <= 2) return launch_typed<T, 2>(a, stream);
    if (a.Hg <= 4) return launch_typed<T, 4>(a, stream);
    return launch_typed<T, 8>(a, stream);
}

}  // namespace

cudaError_t weighted_rows_launch(const float* w, const std::int64_t* rows, const void* values, DType dtype, int G,
                                 int Hg, long long t, long long R, int Dv, float* out, cudaStream_t stream) {
    if (G < 0 || G >= 65536 || Hg < 0 || t < 0 || R < 0 || Dv < 1 || Dv > kWeightedMaxDv) {
        return cudaErrorInvalidValue;
    }
    if (G == 0 || Hg == 0 || t == 0 || R == 0) return cudaSuccess;
    if ((t + kChunk - 1) / kChunk > 2147483647LL) return cudaErrorInvalidValue;
    WeightedArgs a{w, rows, values, G, Hg, Dv, (Dv + 31) / 32 * 32, t, R, out};
    switch (dtype) {
        case DType::F32:
            return launch_heads<float>(a, stream);
        case DType::F16:
            return launch_heads<__half>(a, stream);
        case DType::BF16:
            return launch_heads<__nv_bfloat16>(a, stream);
    }
    return cudaErrorInvalidValue;
}

}  // namespace cluster
}  // namespace kvstore
