// Torch bindings of the cluster kernels (csrc/cuda/cluster_rank.cu,
// cluster_runs.cu, candidate_scores.cu, copy_rows.cu, kmeans_update.cu, weighted_rows.cu) for
// kvstore._cuda. The Python layer (kvstore/gpu/cluster_ops.py,
// kvstore/gpu/kmeans.py) checks arguments with messages naming them; the
// checks here guard the kernels against misuse.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include <cmath>
#include <cstdint>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "candidate_scores.h"
#include "cluster_rank.h"
#include "cluster_runs.h"
#include "copy_rows.h"
#include "kmeans_update.h"
#include "weighted_rows.h"
#include "message_text.h"
#include "registry.h"

namespace {

using kvstore_bindings::text;

using kvstore::cluster::DType;

void check_cuda(const torch::Tensor& t, const char* name) {
    TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor");
    TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

void check_launch(cudaError_t err, const char* what) {
    TORCH_CHECK(err == cudaSuccess, what, " failed: ", cudaGetErrorString(err));
}

// The centroids' dtype is q's, or int8 with centroid_scale f32 [G, C] (contiguous, on q's device): the scale
// pointer, or null for centroids of q's dtype.
const float* centroid_scale_ptr(const torch::Tensor& q, const torch::Tensor& centroids,
                                const c10::optional<torch::Tensor>& centroid_scale) {
    if (!centroid_scale.has_value()) {
        TORCH_CHECK(centroids.scalar_type() == q.scalar_type(), "centroids must have q's dtype");
        return nullptr;
    }
    const torch::Tensor& cs = *centroid_scale;
    check_cuda(cs, "centroid_scale");
    TORCH_CHECK(centroids.scalar_type() == torch::kInt8, "centroids with a centroid_scale must be int8");
    TORCH_CHECK(q.scalar_type() == torch::kBFloat16 || q.scalar_type() == torch::kHalf,
                "int8 centroids need q in bfloat16 or float16");
    TORCH_CHECK(cs.scalar_type() == torch::kFloat32 && cs.dim() == 2 && cs.size(0) == centroids.size(0) &&
                    cs.size(1) == centroids.size(1),
                "centroid_scale must be float32 [G, C]");
    TORCH_CHECK(cs.device() == q.device(), "centroid_scale must be on q's device");
    return cs.data_ptr<float>();
}

// q [G, Hg, D], centroids [G, C, D] (same dtype), sizes f32 [G, C] -> (scores f32 [G, Hg, C], probs f32 [G, C]);
// with q_bonus f32 [G, Hg] and radii f32 [G, C], probs rank by scores + bonus_scale * q_bonus * radii
// (cluster_rank.h).
std::tuple<torch::Tensor, torch::Tensor> cluster_scores(const torch::Tensor& q, const torch::Tensor& centroids,
                                                        const torch::Tensor& sizes, double scale,
                                                        const c10::optional<torch::Tensor>& q_bonus,
                                                        const c10::optional<torch::Tensor>& radii,
                                                        double bonus_scale,
                                                        const c10::optional<torch::Tensor>& centroid_scale) {
    check_cuda(q, "q");
    check_cuda(centroids, "centroids");
    check_cuda(sizes, "sizes");
    TORCH_CHECK(q.dim() == 3 && centroids.dim() == 3 && sizes.dim() == 2,
                "q must be [G, Hg, D], centroids [G, C, D], sizes [G, C]");
    const int64_t G = q.size(0), Hg = q.size(1), D = q.size(2), C = centroids.size(1);
    TORCH_CHECK(centroids.size(0) == G && centroids.size(2) == D, "centroids must be [G, C, D] with q's G and D");
    TORCH_CHECK(sizes.size(0) == G && sizes.size(1) == C, "sizes must be [G, C]");
    const float* cscale = centroid_scale_ptr(q, centroids, centroid_scale);
    TORCH_CHECK(sizes.scalar_type() == torch::kFloat32, "sizes must be float32");
    TORCH_CHECK(q.device() == centroids.device() && q.device() == sizes.device(), "tensors on different devices");
    TORCH_CHECK(G <= 65535 && Hg >= 1 && Hg <= kvstore::cluster::kRankMaxHg && D >= 1 &&
                    Hg * D <= kvstore::cluster::kRankMaxHgTimesD && C <= INT32_MAX,
                "unsupported sizes G=", G, " Hg=", Hg, " C=", C, " D=", D);
    TORCH_CHECK(q_bonus.has_value() == radii.has_value(), "q_bonus and radii go together");
    kvstore::cluster::RadiusArgs rad;
    if (radii.has_value()) {
        check_cuda(*q_bonus, "q_bonus");
        check_cuda(*radii, "radii");
        TORCH_CHECK(q_bonus->dim() == 2 && q_bonus->size(0) == G && q_bonus->size(1) == Hg &&
                        q_bonus->scalar_type() == torch::kFloat32 && q_bonus->is_contiguous(),
                    "q_bonus must be contiguous float32 [G, Hg]");
        TORCH_CHECK(radii->dim() == 2 && radii->size(0) == G && radii->size(1) == C &&
                        radii->scalar_type() == torch::kFloat32 && radii->is_contiguous(),
                    "radii must be contiguous float32 [G, C]");
        TORCH_CHECK(q_bonus->device() == q.device() && radii->device() == q.device(), "tensors on different devices");
        TORCH_CHECK(std::isfinite(bonus_scale), "bonus_scale must be finite");
        rad.q_bonus = q_bonus->data_ptr<float>();
        rad.radii = radii->data_ptr<float>();
        rad.bonus_scale = static_cast<float>(bonus_scale);
    }
    const DType dt = kernel_dtype(q.scalar_type(), "q");
    const c10::cuda::CUDAGuard guard(q.device());
    auto f32 = q.options().dtype(torch::kFloat32);
    torch::Tensor scores = torch::empty({G, Hg, C}, f32);
    torch::Tensor probs = torch::empty({G, C}, f32);
    const long long ws = kvstore::cluster::cluster_scores_workspace_floats(static_cast<int>(G), static_cast<int>(Hg),
                                                                           static_cast<int>(C));
    torch::Tensor work = torch::empty({std::max<long long>(ws, 2)}, f32);
    check_launch(kvstore::cluster::cluster_scores_launch(
                     q.data_ptr(), centroids.data_ptr(), sizes.data_ptr<float>(), dt, static_cast<int>(G),
                     static_cast<int>(Hg), static_cast<int>(C), static_cast<int>(D), static_cast<float>(scale),
                     scores.data_ptr<float>(), probs.data_ptr<float>(), work.data_ptr<float>(),
                     c10::cuda::getCurrentCUDAStream(), nullptr, nullptr, &rad, cscale),
                 "cluster_scores");
    return {scores, probs};
}

// The same with the finite-sample estimator fused (cluster_rank.h FsArgs): key_sd f32 [G, C], table f32
// [nmax + 1, J], slope f32 [nmax + 1] -> (scores f32 [G, Hg, C], probs f32 [G, C], lse f32 [G, Hg]).
std::tuple<torch::Tensor, torch::Tensor, torch::Tensor> cluster_scores_fs(
    const torch::Tensor& q, const torch::Tensor& centroids, const torch::Tensor& sizes, const torch::Tensor& key_sd,
    const torch::Tensor& table, const torch::Tensor& slope, double scale, double step,
    const c10::optional<torch::Tensor>& centroid_scale) {
    check_cuda(q, "q");
    check_cuda(centroids, "centroids");
    check_cuda(sizes, "sizes");
    check_cuda(key_sd, "key_sd");
    check_cuda(table, "table");
    check_cuda(slope, "slope");
    TORCH_CHECK(q.dim() == 3 && centroids.dim() == 3 && sizes.dim() == 2,
                "q must be [G, Hg, D], centroids [G, C, D], sizes [G, C]");
    const int64_t G = q.size(0), Hg = q.size(1), D = q.size(2), C = centroids.size(1);
    TORCH_CHECK(centroids.size(0) == G && centroids.size(2) == D, "centroids must be [G, C, D] of q's G and D");
    const float* cscale = centroid_scale_ptr(q, centroids, centroid_scale);
    TORCH_CHECK(sizes.size(0) == G && sizes.size(1) == C && sizes.scalar_type() == torch::kFloat32,
                "sizes must be float32 [G, C]");
    TORCH_CHECK(key_sd.dim() == 2 && key_sd.size(0) == G && key_sd.size(1) == C &&
                    key_sd.scalar_type() == torch::kFloat32, "key_sd must be float32 [G, C]");
    TORCH_CHECK(table.dim() == 2 && table.size(0) >= 2 && table.size(1) >= 2 && table.scalar_type() == torch::kFloat32,
                "table must be float32 [nmax + 1, J]");
    TORCH_CHECK(slope.dim() == 1 && slope.size(0) == table.size(0) && slope.scalar_type() == torch::kFloat32,
                "slope must be float32 [nmax + 1]");
    TORCH_CHECK(step > 0, "step must be > 0");
    TORCH_CHECK(G <= 65535 && Hg >= 1 && Hg <= 16 && (D == 64 || D == 128) && C <= INT32_MAX,
                "unsupported sizes G=", G, " Hg=", Hg, " C=", C, " D=", D);
    for (const torch::Tensor* t : {&centroids, &sizes, &key_sd, &table, &slope})
        TORCH_CHECK(t->device() == q.device(), "every tensor must be on q's device");
    const DType dt = kernel_dtype(q.scalar_type(), "q");
    const c10::cuda::CUDAGuard guard(q.device());
    auto f32 = q.options().dtype(torch::kFloat32);
    torch::Tensor scores = torch::empty({G, Hg, C}, f32);
    torch::Tensor probs = torch::empty({G, C}, f32);
    torch::Tensor lse = torch::empty({G, Hg}, f32);
    const long long ws = kvstore::cluster::cluster_scores_workspace_floats(static_cast<int>(G), static_cast<int>(Hg),
                                                                           static_cast<int>(C));
    torch::Tensor work = torch::empty({std::max<long long>(ws, 2)}, f32);
    kvstore::cluster::FsArgs fs;
    fs.key_sd = key_sd.data_ptr<float>();
    fs.table = table.data_ptr<float>();
    fs.slope = slope.data_ptr<float>();
    fs.nmax = static_cast<int>(table.size(0) - 1);
    fs.J = static_cast<int>(table.size(1));
    fs.step = static_cast<float>(step);
    fs.inv_step = static_cast<float>(1.0 / step);
    check_launch(kvstore::cluster::cluster_scores_launch(
                     q.data_ptr(), centroids.data_ptr(), sizes.data_ptr<float>(), dt, static_cast<int>(G),
                     static_cast<int>(Hg), static_cast<int>(C), static_cast<int>(D), static_cast<float>(scale),
                     scores.data_ptr<float>(), probs.data_ptr<float>(), work.data_ptr<float>(),
                     c10::cuda::getCurrentCUDAStream(), &fs, lse.data_ptr<float>(), nullptr, cscale),
                 "cluster_scores_fs");
    return {scores, probs, lse};
}

// ids int64 [G, r], offsets int64 [G, C + 1], base / head_row int64 [G], head_len int32 [G]
//   -> (row int64 [G, r + 1], len int32 [G, r + 1]): see cluster_runs.h.
std::tuple<torch::Tensor, torch::Tensor> cluster_runs(const torch::Tensor& ids, const torch::Tensor& offsets,
                                                      const torch::Tensor& base, const torch::Tensor& head_row,
                                                      const torch::Tensor& head_len) {
    const torch::Tensor* tensors[] = {&ids, &offsets, &base, &head_row, &head_len};
    const char* names[] = {"ids", "offsets", "base", "head_row", "head_len"};
    for (int i = 0; i < 5; ++i) {
        check_cuda(*tensors[i], names[i]);
        TORCH_CHECK(tensors[i]->device() == ids.device(), names[i], " must be on ids' device");
    }
    TORCH_CHECK(ids.dim() == 2 && ids.scalar_type() == torch::kInt64, "ids must be int64 [G, r]");
    const int64_t G = ids.size(0), r = ids.size(1);
    TORCH_CHECK(offsets.dim() == 2 && offsets.size(0) == G && offsets.size(1) >= 1 &&
                    offsets.scalar_type() == torch::kInt64, "offsets must be int64 [G, C + 1]");
    TORCH_CHECK(base.numel() == G && head_row.numel() == G && head_len.numel() == G &&
                    base.scalar_type() == torch::kInt64 && head_row.scalar_type() == torch::kInt64 &&
                    head_len.scalar_type() == torch::kInt32,
                "base, head_row must be int64 [G], head_len int32 [G]");
    TORCH_CHECK(G <= INT32_MAX && r < INT32_MAX, "ids is too large");
    const c10::cuda::CUDAGuard guard(ids.device());
    torch::Tensor row = torch::empty({G, r + 1}, ids.options());
    torch::Tensor len = torch::empty({G, r + 1}, ids.options().dtype(torch::kInt32));
    check_launch(kvstore::cluster::cluster_runs_launch(
                     ids.data_ptr<int64_t>(), static_cast<int>(G), static_cast<int>(r), offsets.data_ptr<int64_t>(),
                     offsets.size(1) - 1, base.data_ptr<int64_t>(), head_row.data_ptr<int64_t>(),
                     head_len.data_ptr<int32_t>(), row.data_ptr<int64_t>(), len.data_ptr<int32_t>(),
                     c10::cuda::getCurrentCUDAStream()),
                 "cluster_runs");
    return {row, len};
}

// q [G, Hg, D], keys [rows, D] (q's dtype, or int8 with key_scale f32 [rows]), run_row / run_len / run_pos int64
// [G, r] -> (scores f32 [G, Hg, width], run_lse f32 [G, Hg, r]): see candidate_scores.h.
std::tuple<torch::Tensor, torch::Tensor> candidate_scores(const torch::Tensor& q, const torch::Tensor& keys,
                                                          const torch::Tensor& run_row, const torch::Tensor& run_len,
                                                          const torch::Tensor& run_pos, int64_t width, double scale,
                                                          int64_t runs_per_block,
                                                          const c10::optional<torch::Tensor>& key_scale) {
    check_cuda(q, "q");
    check_cuda(keys, "keys");
    TORCH_CHECK(q.dim() == 3 && keys.dim() == 2, "q must be [G, Hg, D], keys [rows, D]");
    const int64_t G = q.size(0), Hg = q.size(1), D = q.size(2);
    const float* kscale = nullptr;
    if (key_scale.has_value()) {
        const torch::Tensor& ks = *key_scale;
        check_cuda(ks, "key_scale");
        TORCH_CHECK(keys.size(1) == D && keys.scalar_type() == torch::kInt8,
                    "keys with a key_scale must be int8 [rows, D] of q's D");
        TORCH_CHECK(ks.scalar_type() == torch::kFloat32 && ks.dim() == 1 && ks.size(0) == keys.size(0),
                    "key_scale must be float32 [rows]");
        TORCH_CHECK(ks.device() == q.device(), "key_scale must be on q's device");
        kscale = ks.data_ptr<float>();
    } else {
        TORCH_CHECK(keys.size(1) == D && keys.scalar_type() == q.scalar_type(),
                    "keys must be [rows, D] of q's D and dtype");
    }
    TORCH_CHECK(keys.device() == q.device(), "keys must be on q's device");
    const torch::Tensor* runs[] = {&run_row, &run_len, &run_pos};
    const char* names[] = {"run_row", "run_len", "run_pos"};
    for (int i = 0; i < 3; ++i) {
        check_cuda(*runs[i], names[i]);
        TORCH_CHECK(runs[i]->dim() == 2 && runs[i]->size(0) == G && runs[i]->size(1) == run_row.size(1) &&
                        runs[i]->scalar_type() == torch::kInt64,
                    names[i], " must be int64 [G, r] like run_row");
        TORCH_CHECK(runs[i]->device() == q.device(), names[i], " must be on q's device");
    }
    const int64_t r = run_row.size(1);
    TORCH_CHECK(width >= 0, "width must be >= 0, got ", width);
    TORCH_CHECK(runs_per_block >= 0 && runs_per_block <= 4096, "runs_per_block must be in [0, 4096]");
    TORCH_CHECK(Hg <= kvstore::cluster::kCandMaxHg && D >= 1 && Hg * D <= kvstore::cluster::kCandMaxHgTimesD &&
                    G <= INT32_MAX && r <= INT32_MAX && G * r <= INT32_MAX,
                "unsupported sizes G=", G, " Hg=", Hg, " D=", D, " r=", r);
    const DType dt = kernel_dtype(q.scalar_type(), "q");
    const c10::cuda::CUDAGuard guard(q.device());
    auto f32 = q.options().dtype(torch::kFloat32);
    torch::Tensor scores = torch::full({G, Hg, width}, -INFINITY, f32);  // the kernel writes the runs' positions
    torch::Tensor lse = torch::empty({G, Hg, r}, f32);
    check_launch(kvstore::cluster::candidate_scores_launch(
                     q.data_ptr(), keys.data_ptr(), dt, static_cast<int>(G), static_cast<int>(Hg), static_cast<int>(D),
                     static_cast<int>(r), keys.size(0), run_row.data_ptr<int64_t>(), run_len.data_ptr<int64_t>(),
                     run_pos.data_ptr<int64_t>(), width, static_cast<float>(scale), scores.data_ptr<float>(),
                     lse.data_ptr<float>(), c10::cuda::getCurrentCUDAStream(), static_cast<int>(runs_per_block),
                     kscale),
                 "candidate_scores");
    return {scores, lse};
}

// probs f32 [G, C] -> (ret int64 [G, r], est int64 [G, e]): the r best and the next e, each in ascending id order.
std::tuple<torch::Tensor, torch::Tensor> select_clusters(const torch::Tensor& probs, int64_t r, int64_t e) {
    check_cuda(probs, "probs");
    TORCH_CHECK(probs.dim() == 2 && probs.scalar_type() == torch::kFloat32, "probs must be float32 [G, C]");
    const int64_t G = probs.size(0), C = probs.size(1);
    const c10::cuda::CUDAGuard guard(probs.device());
    TORCH_CHECK(r >= 0 && e >= 0 && r + e >= 1 && r + e <= C && C <= INT32_MAX,
                "select_clusters: need 1 <= r + e <= C < 2**31, got r=", r, " e=", e, " C=", C);
    TORCH_CHECK(G <= INT32_MAX, "too many rows");
    auto i64 = probs.options().dtype(torch::kInt64);
    torch::Tensor ret = torch::empty({G, r}, i64);
    torch::Tensor est = torch::empty({G, e}, i64);
    check_launch(kvstore::cluster::cluster_select_launch(probs.data_ptr<float>(), static_cast<int>(G),
                                                         static_cast<int>(C), static_cast<int>(r), static_cast<int>(e),
                                                         ret.data_ptr<int64_t>(), est.data_ptr<int64_t>(),
                                                         c10::cuda::getCurrentCUDAStream()),
                 "select_clusters");
    return {ret, est};
}

// dst_k [rows_d, Dk], src_k [rows_s, Dk] (and v likewise, optional): copies the M runs in one launch.
void copy_rows(torch::Tensor dst_k, c10::optional<torch::Tensor> dst_v, const torch::Tensor& src_k,
               c10::optional<torch::Tensor> src_v, const torch::Tensor& src_row, const torch::Tensor& dst_row,
               const torch::Tensor& length, int64_t blocks_per_run) {
    check_cuda(dst_k, "dst_k");
    TORCH_CHECK(src_k.is_contiguous(), "src_k must be contiguous");
    TORCH_CHECK(src_k.is_cuda() || src_k.is_pinned(), "src_k must be a CUDA tensor or pinned CPU memory");
    TORCH_CHECK(dst_k.dim() == 2 && src_k.dim() == 2 && dst_k.size(1) == src_k.size(1) &&
                    dst_k.scalar_type() == src_k.scalar_type(),
                "dst_k and src_k must be [rows, D] of one D and dtype");
    TORCH_CHECK(dst_v.has_value() == src_v.has_value(), "give both dst_v and src_v or neither");
    long long vb = 0;
    void* dv = nullptr;
    const void* sv = nullptr;
    if (dst_v.has_value()) {
        const torch::Tensor& a = *dst_v;
        const torch::Tensor& b = *src_v;
        check_cuda(a, "dst_v");
        TORCH_CHECK(b.is_contiguous(), "src_v must be contiguous");
        TORCH_CHECK(b.is_cuda() || b.is_pinned(), "src_v must be a CUDA tensor or pinned CPU memory");
        TORCH_CHECK(a.dim() == 2 && b.dim() == 2 && a.size(1) == b.size(1) && a.scalar_type() == b.scalar_type(),
                    "dst_v and src_v must be [rows, Dv] of one Dv and dtype");
        TORCH_CHECK(a.size(0) == dst_k.size(0) && b.size(0) == src_k.size(0), "v and k must have the same rows");
        TORCH_CHECK(a.device() == dst_k.device(), "dst_v must be on dst_k's device");
        vb = static_cast<long long>(a.size(1)) * a.element_size();
        dv = a.data_ptr();
        sv = b.data_ptr();
    }
    check_cuda(src_row, "src_row");
    check_cuda(dst_row, "dst_row");
    check_cuda(length, "length");
    TORCH_CHECK(src_row.scalar_type() == torch::kInt64 && dst_row.scalar_type() == torch::kInt64 &&
                    length.scalar_type() == torch::kInt32,
                "src_row and dst_row must be int64, length int32");
    const int64_t M = src_row.numel();
    TORCH_CHECK(dst_row.numel() == M && length.numel() == M && M <= INT32_MAX, "src_row, dst_row, length must be [M]");
    TORCH_CHECK(src_row.device() == dst_k.device() && dst_row.device() == dst_k.device() &&
                    length.device() == dst_k.device(),
                "src_row, dst_row, length must be on dst_k's device");
    if (src_k.is_cuda()) TORCH_CHECK(src_k.device() == dst_k.device(), "src_k must be on dst_k's device");
    const c10::cuda::CUDAGuard guard(dst_k.device());
    check_launch(kvstore::cluster::copy_rows_launch(
                     dst_k.data_ptr(), dv, src_k.data_ptr(), sv,
                     static_cast<long long>(dst_k.size(1)) * dst_k.element_size(), vb, dst_k.size(0), src_k.size(0),
                     src_row.data_ptr<int64_t>(), dst_row.data_ptr<int64_t>(), length.data_ptr<int32_t>(),
                     static_cast<int>(M), static_cast<int>(blocks_per_run), c10::cuda::getCurrentCUDAStream()),
                 "copy_rows");
}

// x [R, D], order int64 [n], offsets int64 [K + 1], fallback f32 [K, D] or None -> means f32 [K, D].
torch::Tensor kmeans_means(const torch::Tensor& x, const torch::Tensor& order, const torch::Tensor& offsets,
                           c10::optional<torch::Tensor> fallback, c10::optional<torch::Tensor> shift) {
    check_cuda(x, "x");
    check_cuda(order, "order");
    check_cuda(offsets, "offsets");
    TORCH_CHECK(x.dim() == 2 && order.dim() == 1 && offsets.dim() == 1 && offsets.numel() >= 1,
                "x must be [R, D], order [n], offsets [K + 1]");
    TORCH_CHECK(order.scalar_type() == torch::kInt64 && offsets.scalar_type() == torch::kInt64,
                "order and offsets must be int64");
    TORCH_CHECK(order.device() == x.device() && offsets.device() == x.device(), "tensors on different devices");
    const int64_t K = offsets.numel() - 1, D = x.size(1);
    TORCH_CHECK(D >= 1 && D <= INT32_MAX, "x must have 1 <= D columns");
    const float* fb = nullptr;
    if (fallback.has_value()) {
        check_cuda(*fallback, "fallback");
        TORCH_CHECK(fallback->scalar_type() == torch::kFloat32 && fallback->dim() == 2 && fallback->size(0) == K &&
                        fallback->size(1) == D && fallback->device() == x.device(),
                    "fallback must be float32 [K, D] on x's device");
        fb = fallback->data_ptr<float>();
    }
    const float* sh = nullptr;
    int64_t shift_every = 1;
    if (shift.has_value()) {
        check_cuda(*shift, "shift");
        TORCH_CHECK(shift->scalar_type() == torch::kFloat32 && shift->dim() == 2 && shift->size(0) >= 1 &&
                        shift->size(1) == D && K % shift->size(0) == 0 && shift->is_contiguous() &&
                        shift->device() == x.device(),
                    "shift must be contiguous float32 [B, D] on x's device, with B dividing the cluster count");
        sh = shift->data_ptr<float>();
        shift_every = K / shift->size(0);
    }
    const DType dt = kernel_dtype(x.scalar_type(), "x");
    const c10::cuda::CUDAGuard guard(x.device());
    torch::Tensor means = torch::empty({K, D}, x.options().dtype(torch::kFloat32));
    check_launch(kvstore::cluster::kmeans_means_launch(x.data_ptr(), dt, order.data_ptr<int64_t>(),
                                                       offsets.data_ptr<int64_t>(), K, static_cast<int>(D), fb, sh,
                                                       shift_every, means.data_ptr<float>(),
                                                       c10::cuda::getCurrentCUDAStream()),
                 "kmeans_means");
    return means;
}

// x [B, L, D] (bf16/fp16), cen f32 [B, C, D], mu f32 [B, D] -> (best f32 [B, L], arg int64 [B, L]): each row's
// best centroid direction and its score (the row centred by mu; see kmeans_update.h).
std::tuple<torch::Tensor, torch::Tensor> kmeans_assign(const torch::Tensor& x, const torch::Tensor& cen,
                                                       const torch::Tensor& mu, c10::optional<torch::Tensor> ncent,
                                                       bool precise) {
    check_cuda(x, "x");
    check_cuda(cen, "cen");
    check_cuda(mu, "mu");
    TORCH_CHECK(x.dim() == 3 && cen.dim() == 3 && mu.dim() == 2, "x must be [B, L, D], cen [B, C, D], mu [B, D]");
    const int64_t B = x.size(0), L = x.size(1), D = x.size(2), C = cen.size(1);
    TORCH_CHECK(cen.size(0) == B && cen.size(2) == D && C >= 1 && cen.scalar_type() == torch::kFloat32,
                "cen must be float32 [B=" + std::to_string(B) + ", C >= 1, D=" + std::to_string(D) + "]");
    TORCH_CHECK(mu.size(0) == B && mu.size(1) == D && mu.scalar_type() == torch::kFloat32, "mu must be float32 [B, D]");
    TORCH_CHECK(C <= INT32_MAX && D <= INT32_MAX, "C and D must fit in int32");
    TORCH_CHECK(cen.device() == x.device() && mu.device() == x.device(), "tensors on different devices");
    const int* nc = nullptr;
    if (ncent.has_value()) {
        check_cuda(*ncent, "ncent");
        TORCH_CHECK(ncent->dim() == 1 && ncent->size(0) == B && ncent->scalar_type() == torch::kInt32 &&
                        ncent->device() == x.device(),
                    "ncent must be int32 [B] on x's device");
        nc = ncent->data_ptr<int>();
    }
    const DType dt = kernel_dtype(x.scalar_type(), "x");
    const c10::cuda::CUDAGuard guard(x.device());
    TORCH_CHECK(kvstore::cluster::kmeans_assign_supported(dt, static_cast<int>(D)),
                "kmeans_assign needs bf16 or fp16 rows of 64, 128 or 256 columns and an sm_80+ device");
    torch::Tensor best = torch::empty({B, L}, x.options().dtype(torch::kFloat32));
    torch::Tensor arg = torch::empty({B, L}, x.options().dtype(torch::kInt64));
    torch::Tensor terms = torch::empty({B, 2, C, D}, x.options());
    torch::Tensor bias = torch::empty({B, C}, x.options().dtype(torch::kFloat32));
    check_launch(kvstore::cluster::kmeans_assign_launch(x.data_ptr(), cen.data_ptr<float>(), mu.data_ptr<float>(), nc, dt,
                                                        B, L, static_cast<int>(C), static_cast<int>(D),
                                                        precise ? 2 : 1, terms.data_ptr(), bias.data_ptr<float>(),
                                                        best.data_ptr<float>(), arg.data_ptr<int64_t>(),
                                                        c10::cuda::getCurrentCUDAStream()),
                 "kmeans_assign");
    return {best, arg};
}

// k [S, m, D], v [S, m, Dv], order int64 [S, m], offsets int64 [S, C + 1], cen f32 [S, C, D]; out_k [S, R, D] and
// out_v [S, R, Dv] (R >= m, k's dtype) get the rows in cluster order -> (value sums f32 [S, C, Dv], radii f32 [S, C]).
std::tuple<torch::Tensor, torch::Tensor> cluster_store(const torch::Tensor& k, const torch::Tensor& v,
                                                       const torch::Tensor& order, const torch::Tensor& offsets,
                                                       const torch::Tensor& cen, torch::Tensor out_k,
                                                       torch::Tensor out_v) {
    for (const auto& [t, name] : {std::pair<const torch::Tensor&, const char*>{k, "k"}, {v, "v"}, {order, "order"},
                                  {offsets, "offsets"}, {cen, "cen"}, {out_k, "out_k"}, {out_v, "out_v"}}) {
        TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor");  // layouts are checked below
        TORCH_CHECK(t.device() == k.device(), name, " must be on k's device");
    }
    TORCH_CHECK(k.dim() == 3 && v.dim() == 3 && order.dim() == 2 && offsets.dim() == 2 && cen.dim() == 3 &&
                    out_k.dim() == 3 && out_v.dim() == 3,
                "k, v, cen, out_k, out_v must be 3-D and order, offsets 2-D");
    const int64_t S = k.size(0), m = k.size(1), D = k.size(2), Dv = v.size(2), C = cen.size(1);
    TORCH_CHECK(v.size(0) == S && v.size(1) == m && v.scalar_type() == k.scalar_type(), "v must be [S, m, Dv] like k");
    TORCH_CHECK(order.size(0) == S && order.size(1) == m && order.scalar_type() == torch::kInt64,
                "order must be int64 [S, m]");
    TORCH_CHECK(offsets.size(0) == S && offsets.size(1) == C + 1 && offsets.scalar_type() == torch::kInt64,
                "offsets must be int64 [S, C + 1]");
    TORCH_CHECK(cen.size(0) == S && cen.size(2) == D && cen.scalar_type() == torch::kFloat32, "cen must be f32 [S, C, D]");
    TORCH_CHECK(out_k.size(0) == S && out_k.size(1) >= m && out_k.size(2) == D && out_v.size(0) == S &&
                    out_v.size(1) == out_k.size(1) && out_v.size(2) == Dv && out_k.scalar_type() == k.scalar_type() &&
                    out_v.scalar_type() == k.scalar_type(),
                "out_k, out_v must be [S, R >= m, D / Dv] of k's dtype");
    TORCH_CHECK(C <= INT32_MAX && D <= INT32_MAX && Dv <= INT32_MAX, "C, D and Dv must fit in int32");
    // slots may be strided (the middle tokens of a prefilled [B, H, N, D] layer); rows must be contiguous
    TORCH_CHECK(k.stride(2) == 1 && (m == 1 || (k.stride(1) == D && v.stride(1) == Dv)) && v.stride(2) == 1,
                "k and v must have contiguous rows");
    const int64_t R = out_k.size(1);
    TORCH_CHECK(out_k.stride(2) == 1 && out_k.stride(1) == D && (S == 1 || out_k.stride(0) == R * D) &&
                    out_v.stride(2) == 1 && out_v.stride(1) == Dv && (S == 1 || out_v.stride(0) == R * Dv),
                "out_k and out_v must be contiguous");
    TORCH_CHECK(order.is_contiguous() && offsets.is_contiguous() && cen.is_contiguous(),
                "order, offsets and cen must be contiguous");
    const int64_t k_slot = S > 1 ? k.stride(0) : m * D, v_slot = S > 1 ? v.stride(0) : m * Dv;
    TORCH_CHECK(k_slot >= m * D && v_slot >= m * Dv, "k and v slots must not overlap");
    const DType dt = kernel_dtype(k.scalar_type(), "k");
    const c10::cuda::CUDAGuard guard(k.device());
    torch::Tensor vsum = torch::empty({S, C, Dv}, k.options().dtype(torch::kFloat32));
    torch::Tensor radii = torch::empty({S, C}, k.options().dtype(torch::kFloat32));
    check_launch(kvstore::cluster::cluster_store_launch(
                     k.data_ptr(), v.data_ptr(), k_slot, v_slot, dt, S, m, static_cast<int>(C), static_cast<int>(D),
                     static_cast<int>(Dv), order.data_ptr<int64_t>(), offsets.data_ptr<int64_t>(),
                     cen.data_ptr<float>(), out_k.data_ptr(), out_v.data_ptr(), R,
                     vsum.data_ptr<float>(), radii.data_ptr<float>(), c10::cuda::getCurrentCUDAStream()),
                 "cluster_store");
    return {vsum, radii};
}

// Whether kmeans_assign takes rows like x on x's device.
bool kmeans_assign_supported(const torch::Tensor& x) {
    if (!x.is_cuda() || x.dim() < 1) return false;
    if (x.scalar_type() != torch::kBFloat16 && x.scalar_type() != torch::kHalf) return false;
    const c10::cuda::CUDAGuard guard(x.device());
    const DType dt = x.scalar_type() == torch::kBFloat16 ? DType::BF16 : DType::F16;
    return x.size(-1) <= INT32_MAX && kvstore::cluster::kmeans_assign_supported(dt, static_cast<int>(x.size(-1)));
}

// Checks one weighted_rows job (w f32 [G, Hg, t], rows int64 [G, t], values [R, Dv]) and returns its t.
int64_t check_weighted(const torch::Tensor& w, const torch::Tensor& rows, const torch::Tensor& values, int64_t G,
                       int64_t Hg, int64_t Dv) {
    check_cuda(w, "w");
    check_cuda(rows, "rows");
    check_cuda(values, "values");
    TORCH_CHECK(w.dim() == 3 && w.scalar_type() == torch::kFloat32 && w.size(0) == G && w.size(1) == Hg,
                "w must be float32 [G, Hg, t]");
    const int64_t t = w.size(2);
    TORCH_CHECK(rows.dim() == 2 && rows.size(0) == G && rows.size(1) == t && rows.scalar_type() == torch::kInt64,
                "rows must be int64 [G, t] like w");
    TORCH_CHECK(values.dim() == 2 && values.size(1) == Dv, "values must be [R, Dv]");
    TORCH_CHECK(w.device() == rows.device() && w.device() == values.device(), "tensors on different devices");
    return t;
}

// One or two jobs (w f32 [G, Hg, t], rows int64 [G, t], values [R, Dv]; one G, Hg, Dv and values dtype) in one
// launch -> each job's partial sums f32 [G, chunks, Hg, Dv] of weighted_rows.h (their sum over chunks is
// weighted_rows; the wave step's merge kernel adds them itself).
std::vector<torch::Tensor> weighted_rows_jobs(const std::vector<torch::Tensor>& w,
                                              const std::vector<torch::Tensor>& rows,
                                              const std::vector<torch::Tensor>& values) {
    const size_t n = w.size();
    TORCH_CHECK(n >= 1 && n <= static_cast<size_t>(kvstore::cluster::kWeightedMaxJobs) && rows.size() == n &&
                    values.size() == n,
                "1 to ", text(kvstore::cluster::kWeightedMaxJobs), " jobs of (w, rows, values)");
    TORCH_CHECK(w[0].dim() == 3 && values[0].dim() == 2, "w must be [G, Hg, t] and values [R, Dv]");
    const int64_t G = w[0].size(0), Hg = w[0].size(1), Dv = values[0].size(1);
    TORCH_CHECK(Dv >= 1 && Dv <= kvstore::cluster::kWeightedMaxDv, "values must be [R, Dv] with 1 <= Dv <= ",
                text(kvstore::cluster::kWeightedMaxDv));
    TORCH_CHECK(G < 65536 && Hg <= INT32_MAX, "unsupported sizes G=", G, " Hg=", Hg);
    const DType dt = kernel_dtype(values[0].scalar_type(), "values");
    int64_t t_all = 0;
    bool aligned = true;
    std::vector<int64_t> t(n);
    for (size_t k = 0; k < n; ++k) {
        t[k] = check_weighted(w[k], rows[k], values[k], G, Hg, Dv);
        TORCH_CHECK(values[k].scalar_type() == values[0].scalar_type(), "the jobs' values must have one dtype");
        TORCH_CHECK(w[k].device() == w[0].device(), "the jobs must be on one device");
        t_all += t[k];
        aligned = aligned && kvstore::gpu::is_aligned(values[k].data_ptr(), 16);
    }
    const c10::cuda::CUDAGuard guard(w[0].device());
    std::vector<torch::Tensor> out;
    kvstore::cluster::WeightedJob jobs[kvstore::cluster::kWeightedMaxJobs];
    for (size_t k = 0; k < n; ++k) {
        const long long chunks = kvstore::cluster::weighted_rows_chunks(
            static_cast<int>(G), static_cast<int>(Hg), t[k], t_all, static_cast<int>(Dv), dt, aligned);
        out.push_back(torch::empty({G, chunks, Hg, Dv}, w[k].options()));
        jobs[k] = kvstore::cluster::WeightedJob{w[k].data_ptr<float>(), rows[k].data_ptr<int64_t>(),
                                                values[k].data_ptr(), t[k], values[k].size(0),
                                                out[k].data_ptr<float>()};
    }
    check_launch(kvstore::cluster::weighted_rows_launch(jobs, static_cast<int>(n), dt, static_cast<int>(G),
                                                        static_cast<int>(Hg), static_cast<int>(Dv),
                                                        c10::cuda::getCurrentCUDAStream()),
                 "weighted_rows");
    return out;
}

torch::Tensor weighted_rows_partial(const torch::Tensor& w, const torch::Tensor& rows, const torch::Tensor& values) {
    return weighted_rows_jobs({w}, {rows}, {values})[0];
}

// w f32 [G, Hg, t], rows int64 [G, t], values [R, Dv] -> f32 [G, Hg, Dv]: see weighted_rows.h.
torch::Tensor weighted_rows(const torch::Tensor& w, const torch::Tensor& rows, const torch::Tensor& values) {
    torch::Tensor partial = weighted_rows_partial(w, rows, values);
    return partial.size(1) == 1 ? partial.squeeze(1) : partial.sum(1);
}

}  // namespace

void register_cluster_ops(pybind11::module_& m) {
    m.def("cluster_scores", &cluster_scores, pybind11::arg("q"), pybind11::arg("centroids"), pybind11::arg("sizes"),
          pybind11::arg("scale"), pybind11::arg("q_bonus") = pybind11::none(), pybind11::arg("radii") = pybind11::none(),
          pybind11::arg("bonus_scale") = 1.0, pybind11::arg("centroid_scale") = pybind11::none(),
          "q [G, Hg, D], centroids [G, C, D] (q's dtype, or int8 with centroid_scale f32 [G, C]), sizes f32 [G, C] "
          "(q_bonus f32 [G, Hg], radii f32 [G, C]: rank by scores + bonus_scale * q_bonus * radii) -> "
          "(scores f32 [G, Hg, C], probs f32 [G, C])");
    m.def("select_clusters", &select_clusters, pybind11::arg("probs"), pybind11::arg("r"), pybind11::arg("e"),
          "probs f32 [G, C] -> (ret int64 [G, r], est int64 [G, e]): the r best, the next e, each zone by ascending id");
    m.def("cluster_scores_fs", &cluster_scores_fs, pybind11::arg("q"), pybind11::arg("centroids"),
          pybind11::arg("sizes"), pybind11::arg("key_sd"), pybind11::arg("table"), pybind11::arg("slope"),
          pybind11::arg("scale"), pybind11::arg("step"), pybind11::arg("centroid_scale") = pybind11::none(),
          "cluster scores with the finite-sample estimator -> (scores [G, Hg, C], probs [G, C], lse [G, Hg])");
    m.def("cluster_runs", &cluster_runs, pybind11::arg("ids"), pybind11::arg("offsets"), pybind11::arg("base"),
          pybind11::arg("head_row"), pybind11::arg("head_len"),
          "the run table of a wave decode step: (row int64 [G, r + 1], len int32 [G, r + 1])");
    m.def("candidate_scores", &candidate_scores, pybind11::arg("q"), pybind11::arg("keys"),
          pybind11::arg("run_row"), pybind11::arg("run_len"), pybind11::arg("run_pos"), pybind11::arg("width"),
          pybind11::arg("scale"), pybind11::arg("runs_per_block") = 0, pybind11::arg("key_scale") = pybind11::none(),
          "exact scores of the candidate runs: (scores f32 [G, Hg, width], run_lse f32 [G, Hg, r])");
    m.def("copy_rows", &copy_rows, pybind11::arg("dst_k"), pybind11::arg("dst_v"), pybind11::arg("src_k"),
          pybind11::arg("src_v"), pybind11::arg("src_row"), pybind11::arg("dst_row"), pybind11::arg("length"),
          pybind11::arg("blocks_per_run") = 1, "Copy M runs of rows (k and optionally v) in one launch");
    m.def("kmeans_assign", &kmeans_assign, pybind11::arg("x"), pybind11::arg("cen"), pybind11::arg("mu"),
          pybind11::arg("ncent") = pybind11::none(), pybind11::arg("precise") = true,
          "Best centroid of each row (k-means assignment on tensor cores): (best f32 [B, L], arg int64 [B, L]); "
          "precise=False scores against the 16-bit directions only");
    m.def("cluster_store", &cluster_store, pybind11::arg("k"), pybind11::arg("v"), pybind11::arg("order"),
          pybind11::arg("offsets"), pybind11::arg("cen"), pybind11::arg("out_k"), pybind11::arg("out_v"),
          "Rows in cluster order into out_k / out_v, with each cluster's value sum and radius: (vsum, radii)");
    m.def("kmeans_assign_supported", &kmeans_assign_supported, pybind11::arg("x"),
          "Whether kmeans_assign takes rows like x on x's device");
    m.def("kmeans_means", &kmeans_means, pybind11::arg("x"), pybind11::arg("order"), pybind11::arg("offsets"),
          pybind11::arg("fallback") = pybind11::none(), pybind11::arg("shift") = pybind11::none(),
          "x [R, D], order int64, offsets int64 [K + 1], fallback f32 [K, D] or None, shift f32 [B, D] or None "
          "-> means f32 [K, D] (minus the shift of cluster k's batch k // (K / B))");
    m.def("weighted_rows", &weighted_rows, pybind11::arg("w"), pybind11::arg("rows"), pybind11::arg("values"),
          "w f32 [G, Hg, t], rows int64 [G, t], values [R, Dv] -> f32 [G, Hg, Dv]: sum_i w[g, h, i] values[rows[g, i]]");
    m.def("weighted_rows_partial", &weighted_rows_partial, pybind11::arg("w"), pybind11::arg("rows"),
          pybind11::arg("values"), "weighted_rows before the sum over its chunks: f32 [G, chunks, Hg, Dv]");
    m.def("weighted_rows_jobs", &weighted_rows_jobs, pybind11::arg("w"), pybind11::arg("rows"),
          pybind11::arg("values"),
          "weighted_rows_partial of one or two jobs (lists of w, rows, values) in one launch: their partials");
}
