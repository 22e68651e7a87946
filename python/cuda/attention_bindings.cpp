// Torch bindings of the sparse decode attention kernels (csrc/cuda/sparse_attention.cu).
// kvstore/gpu/attention_ops.py validates first and names the argument; the
// checks here keep direct callers from crashing the process.
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <pybind11/stl.h>

#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "message_text.h"
#include "registry.h"
#include "sparse_attention.h"

namespace {

using kvstore_bindings::text;

namespace ka = kvstore::attn;

at::ScalarType scalar_type_of(int64_t code) {
    switch (code) {
        case 0:
            return at::kFloat;
        case 1:
            return at::kHalf;
        case 2:
            return at::kBFloat16;
        default:
            TORCH_CHECK(false, "out_dtype code must be 0 (float32), 1 (float16) or 2 (bfloat16), got ", text(code));
    }
    return at::kFloat;  // unreachable
}

// A contiguous tensor on `dev` of dtype `t` with `dim` dimensions.
void check_device_tensor(const at::Tensor& x, const at::Device& dev, at::ScalarType t, int64_t dim,
                         const char* name) {
    TORCH_CHECK(x.is_cuda() && x.device() == dev, name, " must be on ", text(dev), ", got ", text(x.device()));
    TORCH_CHECK(x.scalar_type() == t, name, " must be ", text(t), ", got ", text(x.scalar_type()));
    TORCH_CHECK(x.dim() == dim, name, " must be ", text(dim), "-D, got ", text(x.dim()), "-D");
    TORCH_CHECK(x.is_contiguous(), name, " must be contiguous");
}

bool aligned16(const at::Tensor& x) { return reinterpret_cast<std::uintptr_t>(x.data_ptr()) % 16 == 0; }

// The device address of a source table: its own on `dev`, or the device
// mapping of pinned host memory (zero-copy reads over the bus).
const void* source_pointer(const at::Tensor& x, const at::Device& dev, const std::string& name) {
    TORCH_CHECK(x.is_contiguous(), name, " must be contiguous");
    if (x.numel() == 0) return nullptr;
    TORCH_CHECK(aligned16(x), name, " must be 16-byte aligned");
    if (x.is_cuda()) {
        TORCH_CHECK(x.device() == dev, name, " is on ", text(x.device()), ", q on ", text(dev));
        return x.data_ptr();
    }
    TORCH_CHECK(x.device().is_cpu() && x.is_pinned(), name, " must be on ", dev,
                " or in pinned host memory (pin_memory()), got ", text(x.device()));
    cudaPointerAttributes attr{};
    const cudaError_t err = cudaPointerGetAttributes(&attr, x.data_ptr());
    if (err != cudaSuccess) {
        (void)cudaGetLastError();  // clear the (non-sticky) error
        TORCH_CHECK(false, name, ": cannot map pinned host memory for the device: ", cudaGetErrorString(err));
    }
    TORCH_CHECK(attr.devicePointer != nullptr, name, ": pinned host memory has no device mapping");
    return attr.devicePointer;
}

std::tuple<at::Tensor, at::Tensor> sparse_decode_attention(
    const at::Tensor& q, const std::vector<at::Tensor>& ks, const std::vector<at::Tensor>& vs,
    const at::Tensor& run_src, const at::Tensor& run_row, const at::Tensor& run_len, const at::Tensor& run_offsets,
    const std::optional<at::Tensor>& est_scores, const std::optional<at::Tensor>& est_sizes,
    const std::optional<at::Tensor>& est_value_sums, const std::optional<at::Tensor>& est_ids, double scale,
    int64_t num_splits, int64_t est_splits) {
    TORCH_CHECK(q.is_cuda(), "q must be a CUDA tensor, got ", text(q.device()));
    const at::Device dev = q.device();
    const c10::cuda::CUDAGuard guard(dev);
    ka::SparseAttentionArgs a;
    a.dtype = kernel_dtype(q.scalar_type(), "q");
    check_device_tensor(q, dev, q.scalar_type(), 3, "q");
    TORCH_CHECK(q.numel() == 0 || aligned16(q), "q must be 16-byte aligned");
    TORCH_CHECK(q.size(0) <= INT32_MAX, "q has too many slots (G)");
    a.G = static_cast<int>(q.size(0));
    a.Hg = static_cast<int>(q.size(1));
    a.D = static_cast<int>(q.size(2));

    TORCH_CHECK(ks.size() == vs.size(), "got ", text(ks.size()), " key tables and ", text(vs.size()), " value tables");
    TORCH_CHECK(!ks.empty() && ks.size() <= static_cast<size_t>(ka::kMaxSources), "sources must number 1 to ",
                ka::kMaxSources, ", got ", ks.size());
    a.num_sources = static_cast<int>(ks.size());
    for (int i = 0; i < a.num_sources; ++i) {
        const std::string kn = "sources[" + std::to_string(i) + "].k", vn = "sources[" + std::to_string(i) + "].v";
        const at::Tensor& k = ks[i];
        const at::Tensor& v = vs[i];
        TORCH_CHECK(k.dim() == 2 && v.dim() == 2, kn, " and ", vn, " must be 2-D");
        TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), kn, " and ", vn,
                    " must have q's dtype ", text(q.scalar_type()));
        TORCH_CHECK(k.size(1) == a.D, kn, " has dim ", text(k.size(1)), ", q has ", text(a.D));
        TORCH_CHECK(v.size(0) == k.size(0), vn, " has ", text(v.size(0)), " rows, ", kn, " has ", text(k.size(0)));
        if (i == 0) a.Dv = static_cast<int>(v.size(1));
        TORCH_CHECK(v.size(1) == a.Dv, vn, " has dim ", text(v.size(1)), ", sources[0].v has ", text(a.Dv));
        a.k[i] = source_pointer(k, dev, kn);
        a.v[i] = source_pointer(v, dev, vn);
        a.rows[i] = k.size(0);
    }
    TORCH_CHECK(ka::sparse_attention_supported(a.D, a.Dv, a.Hg),
                "unsupported sizes: D and Dv must be 64 or 128 and Hg in [1, ", text(ka::kMaxGroup), "], got D = ",
                text(a.D), ", Dv = ", text(a.Dv), ", Hg = ", text(a.Hg));

    check_device_tensor(run_src, dev, at::kInt, 1, "runs.src");
    check_device_tensor(run_row, dev, at::kLong, 1, "runs.row");
    check_device_tensor(run_len, dev, at::kInt, 1, "runs.length");
    check_device_tensor(run_offsets, dev, at::kInt, 1, "runs.offsets");
    TORCH_CHECK(run_row.size(0) == run_src.size(0) && run_len.size(0) == run_src.size(0),
                "runs.src, runs.row and runs.length must have one length");
    TORCH_CHECK(run_offsets.size(0) == q.size(0) + 1, "runs.offsets must have G + 1 entries");
    a.num_runs = run_src.size(0);
    a.run_src = run_src.data_ptr<int32_t>();
    a.run_row = run_row.data_ptr<int64_t>();
    a.run_len = run_len.data_ptr<int32_t>();
    a.run_offsets = run_offsets.data_ptr<int32_t>();

    const int given = est_scores.has_value() + est_sizes.has_value() + est_value_sums.has_value() +
                      est_ids.has_value();
    TORCH_CHECK(given == 0 || given == 4, "estimation needs scores, sizes, value_sums and ids together");
    TORCH_CHECK(est_splits >= 0, "est_splits must be >= 0");
    a.scale = static_cast<float>(scale);
    if (given == 4) {
        const at::Tensor& sc = *est_scores;
        const at::Tensor& sz = *est_sizes;
        const at::Tensor& vsum = *est_value_sums;
        const at::Tensor& ids = *est_ids;
        check_device_tensor(sc, dev, at::kFloat, 3, "estimation.scores");
        check_device_tensor(sz, dev, at::kFloat, 2, "estimation.sizes");
        check_device_tensor(vsum, dev, at::kFloat, 3, "estimation.value_sums");
        check_device_tensor(ids, dev, at::kLong, 2, "estimation.ids");
        a.C = sc.size(2);
        a.E = ids.size(1);
        TORCH_CHECK(sc.size(0) == a.G && sc.size(1) == a.Hg, "estimation.scores must be [G, Hg, C]");
        TORCH_CHECK(sz.size(0) == a.G && sz.size(1) == a.C, "estimation.sizes must be [G, C]");
        TORCH_CHECK(vsum.size(0) == a.G && vsum.size(1) == a.C && vsum.size(2) == a.Dv,
                    "estimation.value_sums must be [G, C, Dv]");
        TORCH_CHECK(ids.size(0) == a.G, "estimation.ids must be [G, E]");
        TORCH_CHECK(a.E == 0 || a.C > 0, "estimation.ids is not empty but there are no clusters");
        TORCH_CHECK(vsum.numel() == 0 || aligned16(vsum), "estimation.value_sums must be 16-byte aligned");
        a.est_scores = sc.data_ptr<float>();
        a.est_sizes = sz.data_ptr<float>();
        a.est_value_sums = vsum.data_ptr<float>();
        a.est_ids = ids.data_ptr<int64_t>();
        a.est_splits = a.E > 0 ? static_cast<int>(std::min<int64_t>(est_splits, ka::kMaxSplits)) : 0;
        TORCH_CHECK(a.E == 0 || a.est_splits >= 1, "est_splits must be >= 1 when the estimation zone is not empty");
    }
    TORCH_CHECK(num_splits >= 1 && num_splits + a.est_splits <= ka::kMaxSplits, "num_splits must be in [1, ",
                text(ka::kMaxSplits - a.est_splits), "], got ", text(num_splits));
    a.num_splits = static_cast<int>(num_splits);

    const int64_t S = a.num_splits + a.est_splits;
    const auto f32 = q.options().dtype(at::kFloat);
    at::Tensor ws_o = at::empty({a.G, a.Hg, S, a.Dv}, f32);
    at::Tensor ws_lse = at::empty({a.G, a.Hg, S}, f32);
    at::Tensor counters = at::zeros({a.G}, q.options().dtype(at::kInt));  // the kernel leaves them zero
    at::Tensor o = at::empty({a.G, a.Hg, a.Dv}, q.options());
    at::Tensor lse = at::empty({a.G, a.Hg}, f32);
    a.q = q.data_ptr();
    a.ws_o = ws_o.data_ptr<float>();
    a.ws_lse = ws_lse.data_ptr<float>();
    a.counters = counters.data_ptr<int>();
    a.out_o = o.data_ptr();
    a.out_lse = lse.data_ptr<float>();
    const cudaError_t err = ka::sparse_decode_attention_launch(a, c10::cuda::getCurrentCUDAStream(dev.index()));
    TORCH_CHECK(err == cudaSuccess, "sparse_decode_attention: ", cudaGetErrorString(err));
    return {o, lse};
}

std::tuple<at::Tensor, at::Tensor> merge_attention_partials(const at::Tensor& o, const at::Tensor& lse,
                                                            int64_t out_dtype) {
    TORCH_CHECK(o.is_cuda(), "o must be a CUDA tensor, got ", text(o.device()));
    const at::Device dev = o.device();
    const c10::cuda::CUDAGuard guard(dev);
    TORCH_CHECK(lse.is_cuda() && lse.device() == dev, "lse must be on ", text(dev), ", got ", text(lse.device()));
    TORCH_CHECK(o.scalar_type() == at::kFloat && lse.scalar_type() == at::kFloat, "o and lse must be float32");
    TORCH_CHECK(o.dim() == 3 && lse.dim() == 2 && o.size(0) == lse.size(0) && o.size(1) == lse.size(1),
                "o must be [P, N, Dv] and lse [P, N]");
    TORCH_CHECK(o.size(2) <= 1 || o.stride(2) == 1, "o's last dimension must be contiguous");
    TORCH_CHECK(o.size(0) <= INT32_MAX && o.size(2) <= INT32_MAX, "o is too large");
    const at::ScalarType ot = scalar_type_of(out_dtype);
    const int64_t P = o.size(0), N = o.size(1), Dv = o.size(2);
    at::Tensor out_o = at::empty({N, Dv}, o.options().dtype(ot));
    at::Tensor out_lse = at::empty({N}, o.options());
    const cudaError_t err = ka::merge_partials_launch(
        o.data_ptr<float>(), lse.data_ptr<float>(), N, static_cast<int>(P), static_cast<int>(Dv), o.stride(1),
        o.stride(0), lse.stride(1), lse.stride(0), 1.4426950408889634f, kernel_dtype(ot, "out_dtype"), out_o.data_ptr(),
        out_lse.data_ptr<float>(), c10::cuda::getCurrentCUDAStream(dev.index()));
    TORCH_CHECK(err == cudaSuccess, "merge_attention_partials: ", cudaGetErrorString(err));
    return {out_o, out_lse};
}

int64_t sparse_attention_blocks_per_sm(int64_t device, int64_t dtype, int64_t D, int64_t Dv, int64_t Hg) {
    const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
    TORCH_CHECK(dtype >= 0 && dtype <= 2, "dtype code must be 0 (f32), 1 (f16) or 2 (bf16), got ", text(dtype));
    return ka::sparse_attention_blocks_per_sm(static_cast<ka::DType>(dtype), static_cast<int>(D),
                                              static_cast<int>(Dv), static_cast<int>(Hg));
}

}  // namespace

void register_sparse_attention(pybind11::module_& m) {
    namespace py = pybind11;
    m.def("sparse_decode_attention", &sparse_decode_attention,
          "Sparse decode attention over row runs + estimation zone (kvstore.gpu.attention_ops); returns (o, lse)",
          py::arg("q"), py::arg("k"), py::arg("v"), py::arg("run_src"), py::arg("run_row"), py::arg("run_len"),
          py::arg("run_offsets"), py::arg("est_scores"), py::arg("est_sizes"), py::arg("est_value_sums"),
          py::arg("est_ids"), py::arg("scale"), py::arg("num_splits"), py::arg("est_splits"));
    m.def("sparse_attention_blocks_per_sm", &sparse_attention_blocks_per_sm,
          "partial-kernel blocks one SM holds at once (device, dtype code 0 f32 / 1 f16 / 2 bf16, D, Dv, Hg)",
          py::arg("device"), py::arg("dtype"), py::arg("D"), py::arg("Dv"), py::arg("Hg"));
    m.def("merge_attention_partials", &merge_attention_partials,
          "Log-sum-exp merge of partials o [P, N, Dv], lse [P, N] (natural log) -> (o [N, Dv], lse [N])",
          py::arg("o"), py::arg("lse"), py::arg("out_dtype"));
}
