// Torch bindings of the wave step's bookkeeping kernels (csrc/cuda/wave_step.cu) for kvstore._cuda (their merge
// kernel adds up the partial sums of cluster_bindings.cpp's weighted_rows_partial). The caller is
// kvstore/attention/selection.py (wave_attend, kernel path), which sizes every output from ClusterBounds; the
// checks here guard the kernels against misuse.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "message_text.h"
#include "registry.h"
#include "wave_step.h"

namespace {

using kvstore_bindings::text;

void check(const torch::Tensor& t, const char* name, at::ScalarType dtype, int64_t dim, const torch::Device& dev) {
    TORCH_CHECK(t.is_cuda() && t.device() == dev, name, " must be a CUDA tensor on ", text(dev));
    TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
    TORCH_CHECK(t.scalar_type() == dtype, name, " must be ", text(dtype), ", got ", text(t.scalar_type()));
    TORCH_CHECK(t.dim() == dim, name, " must be ", text(dim), "-D, got ", text(t.dim()), "-D");
}

void check_shape(const torch::Tensor& t, const char* name, std::vector<int64_t> shape) {
    const std::vector<int64_t> got = t.sizes().vec();
    TORCH_CHECK(got == shape, name, " has shape ", text(got), ", expected ", text(shape));
}

void check_launch(cudaError_t err, const char* what) {
    TORCH_CHECK(err == cudaSuccess, what, " failed: ", cudaGetErrorString(err));
}

// The blocks a slot of the zone and mix kernels: 0 (the launcher's choice) or a team size this device launches.
int checked_team(int64_t G, int64_t team) {
    TORCH_CHECK(team >= 0 && team <= 16, "team must be 0 (automatic) or a team size up to 16, got ", text(team));
    if (team > 0)
        TORCH_CHECK(kvstore::cluster::wave_team_size(static_cast<int>(G), static_cast<int>(team)) == team,
                    "this device cannot launch teams of ", text(team), " blocks");
    return static_cast<int>(team);
}

// wave_team_size: the team size the zone and mix kernels take for G slots (requested 0) on the current device.
int64_t wave_team_size(int64_t G) {
    TORCH_CHECK(G >= 1 && G <= INT32_MAX, "G must be a positive slot count, got ", text(G));
    return kvstore::cluster::wave_team_size(static_cast<int>(G), 0);
}

// probs f32 [G, C], sizes f32 [G, C], scores f32 [G, Hg, C], offsets int64 [G, C + 1], slot_base int64 [G],
// budget int64 [G, 2] or None -> (cand, run_row, run_len, run_pos int64 [G, r], cand_low uint8 [G, r],
// est int64 [G, e], rest_lse f32 [G, Hg], low_lse f32 [G, Hg]).
std::vector<torch::Tensor> wave_zones(const torch::Tensor& probs, const torch::Tensor& sizes,
                                      const torch::Tensor& scores, const torch::Tensor& offsets,
                                      const torch::Tensor& slot_base, c10::optional<torch::Tensor> budget,
                                      int64_t cand_tokens, int64_t est_tokens, int64_t r, int64_t e,
                                      int64_t team) {
    const torch::Device dev = probs.device();
    check(probs, "probs", torch::kFloat32, 2, dev);
    const int64_t G = probs.size(0), C = probs.size(1);
    check(sizes, "sizes", torch::kFloat32, 2, dev);
    check_shape(sizes, "sizes", {G, C});
    check(scores, "scores", torch::kFloat32, 3, dev);
    TORCH_CHECK(scores.size(0) == G && scores.size(2) == C, "scores must be [G, Hg, C]");
    const int64_t Hg = scores.size(1);
    check(offsets, "offsets", torch::kInt64, 2, dev);
    check_shape(offsets, "offsets", {G, C + 1});
    check(slot_base, "slot_base", torch::kInt64, 1, dev);
    check_shape(slot_base, "slot_base", {G});
    const std::int64_t* bptr = nullptr;
    if (budget.has_value()) {
        check(*budget, "budget", torch::kInt64, 2, dev);
        check_shape(*budget, "budget", {G, 2});
        bptr = budget->data_ptr<int64_t>();
    }
    TORCH_CHECK(G <= INT32_MAX && C < INT32_MAX && r >= 0 && r <= INT32_MAX && e >= 0 && e <= INT32_MAX &&
                    Hg >= 1 && Hg <= kvstore::cluster::kStepMaxHg,
                "unsupported sizes G=", G, " C=", C, " Hg=", Hg, " r=", r, " e=", e);
    const c10::cuda::CUDAGuard guard(dev);
    auto i64 = probs.options().dtype(torch::kInt64);
    auto u8 = probs.options().dtype(torch::kUInt8);
    auto f32 = probs.options().dtype(torch::kFloat32);
    torch::Tensor zone = torch::empty({G, C}, u8);
    torch::Tensor cand = torch::empty({G, r}, i64), run_row = torch::empty({G, r}, i64);
    torch::Tensor run_len = torch::empty({G, r}, i64), run_pos = torch::empty({G, r}, i64);
    torch::Tensor low = torch::empty({G, r}, u8), est = torch::empty({G, e}, i64);
    torch::Tensor rest_lse = torch::empty({G, Hg}, f32), low_lse = torch::empty({G, Hg}, f32);
    kvstore::cluster::ZoneArgs a{probs.data_ptr<float>(), sizes.data_ptr<float>(), scores.data_ptr<float>(),
                                 offsets.data_ptr<int64_t>(), slot_base.data_ptr<int64_t>(), bptr, cand_tokens,
                                 est_tokens, static_cast<int>(G), static_cast<int>(Hg), static_cast<int>(C),
                                 static_cast<int>(r), static_cast<int>(e), 0, zone.data_ptr<uint8_t>(),
                                 cand.data_ptr<int64_t>(), run_row.data_ptr<int64_t>(), run_len.data_ptr<int64_t>(),
                                 run_pos.data_ptr<int64_t>(), low.data_ptr<uint8_t>(), est.data_ptr<int64_t>(),
                                 rest_lse.data_ptr<float>(), low_lse.data_ptr<float>()};
    a.team = checked_team(G, team);
    check_launch(kvstore::cluster::wave_zones_launch(a, c10::cuda::getCurrentCUDAStream()), "wave_zones");
    return {cand, run_row, run_len, run_pos, low, est, rest_lse, low_lse};
}

// See wave_step.h (MixArgs) -> (pick_rows, pick_local int64 [G, t], pick_w f32 [G, Hg, t], pick_d, pick_ref f32
// [G, Hg], n_valid int64 [G], mix_rows int64 [G, r + e], mix_w f32 [G, Hg, r + e], rest_w, mix_lse f32 [G, Hg]).
std::vector<torch::Tensor> wave_mix(const torch::Tensor& tok_scores, const torch::Tensor& run_lse,
                                    const torch::Tensor& run_row, const torch::Tensor& run_len,
                                    const torch::Tensor& run_pos, const torch::Tensor& cand_low,
                                    const torch::Tensor& cand, const torch::Tensor& est, const torch::Tensor& scores,
                                    const torch::Tensor& sizes, const torch::Tensor& rest_lse,
                                    const torch::Tensor& low_lse, const torch::Tensor& slot_base,
                                    c10::optional<torch::Tensor> tokens, int64_t tokens_all, int64_t t,
                                    bool calibrate, bool rest, int64_t team) {
    const torch::Device dev = tok_scores.device();
    check(tok_scores, "tok_scores", torch::kFloat32, 3, dev);
    const int64_t G = tok_scores.size(0), Hg = tok_scores.size(1), W = tok_scores.size(2);
    check(run_lse, "run_lse", torch::kFloat32, 3, dev);
    const int64_t r = run_lse.size(2);
    check_shape(run_lse, "run_lse", {G, Hg, r});
    for (auto [x, name] : {std::pair{&run_row, "run_row"}, {&run_len, "run_len"}, {&run_pos, "run_pos"},
                           {&cand, "cand"}}) {
        check(*x, name, torch::kInt64, 2, dev);
        check_shape(*x, name, {G, r});
    }
    check(cand_low, "cand_low", torch::kUInt8, 2, dev);
    check_shape(cand_low, "cand_low", {G, r});
    check(est, "est", torch::kInt64, 2, dev);
    TORCH_CHECK(est.size(0) == G, "est must be [G, e]");
    const int64_t e = est.size(1);
    check(scores, "scores", torch::kFloat32, 3, dev);
    TORCH_CHECK(scores.size(0) == G && scores.size(1) == Hg, "scores must be [G, Hg, C]");
    const int64_t C = scores.size(2);
    check(sizes, "sizes", torch::kFloat32, 2, dev);
    check_shape(sizes, "sizes", {G, C});
    check(rest_lse, "rest_lse", torch::kFloat32, 2, dev);
    check_shape(rest_lse, "rest_lse", {G, Hg});
    check(low_lse, "low_lse", torch::kFloat32, 2, dev);
    check_shape(low_lse, "low_lse", {G, Hg});
    check(slot_base, "slot_base", torch::kInt64, 1, dev);
    check_shape(slot_base, "slot_base", {G});
    const std::int64_t* tptr = nullptr;
    if (tokens.has_value()) {
        check(*tokens, "tokens", torch::kInt64, 1, dev);
        check_shape(*tokens, "tokens", {G});
        tptr = tokens->data_ptr<int64_t>();
    }
    TORCH_CHECK(G <= INT32_MAX && Hg >= 1 && Hg <= kvstore::cluster::kStepMaxHg && r + e <= INT32_MAX &&
                    C < INT32_MAX && t >= 0 && t <= INT32_MAX,
                "unsupported sizes G=", G, " Hg=", Hg, " r=", r, " e=", e, " C=", C, " t=", t);
    const c10::cuda::CUDAGuard guard(dev);
    auto i64 = tok_scores.options().dtype(torch::kInt64);
    auto f32 = tok_scores.options().dtype(torch::kFloat32);
    torch::Tensor u = torch::empty({G, W}, f32);
    torch::Tensor flag = torch::empty({G, W}, tok_scores.options().dtype(torch::kUInt8));
    torch::Tensor rowof = torch::empty({G, W}, i64);
    torch::Tensor pick_rows = torch::empty({G, t}, i64), pick_local = torch::empty({G, t}, i64);
    torch::Tensor pick_w = torch::empty({G, Hg, t}, f32);
    torch::Tensor pick_d = torch::empty({G, Hg}, f32), pick_ref = torch::empty({G, Hg}, f32);
    torch::Tensor n_valid = torch::empty({G}, i64);
    torch::Tensor mix_rows = torch::empty({G, r + e}, i64), mix_w = torch::empty({G, Hg, r + e}, f32);
    torch::Tensor rest_w = torch::empty({G, Hg}, f32), mix_lse = torch::empty({G, Hg}, f32);
    kvstore::cluster::MixArgs a{};
    a.tok_scores = tok_scores.data_ptr<float>();
    a.run_lse = run_lse.data_ptr<float>();
    a.run_row = run_row.data_ptr<int64_t>();
    a.run_len = run_len.data_ptr<int64_t>();
    a.run_pos = run_pos.data_ptr<int64_t>();
    a.cand_low = cand_low.data_ptr<uint8_t>();
    a.cand = cand.data_ptr<int64_t>();
    a.est = est.data_ptr<int64_t>();
    a.scores = scores.data_ptr<float>();
    a.sizes = sizes.data_ptr<float>();
    a.rest_lse = rest_lse.data_ptr<float>();
    a.low_lse = low_lse.data_ptr<float>();
    a.slot_base = slot_base.data_ptr<int64_t>();
    a.tokens = tptr;
    a.tokens_all = tokens_all;
    a.W = W;
    a.G = static_cast<int>(G);
    a.Hg = static_cast<int>(Hg);
    a.C = static_cast<int>(C);
    a.r = static_cast<int>(r);
    a.e = static_cast<int>(e);
    a.t = static_cast<int>(t);
    a.calibrate = calibrate ? 1 : 0;
    a.rest = rest ? 1 : 0;
    a.team = checked_team(G, team);
    a.u = u.data_ptr<float>();
    a.flag = flag.data_ptr<uint8_t>();
    a.rowof = rowof.data_ptr<int64_t>();
    a.pick_rows = pick_rows.data_ptr<int64_t>();
    a.pick_local = pick_local.data_ptr<int64_t>();
    a.pick_w = pick_w.data_ptr<float>();
    a.pick_d = pick_d.data_ptr<float>();
    a.pick_ref = pick_ref.data_ptr<float>();
    a.n_valid = n_valid.data_ptr<int64_t>();
    a.mix_rows = mix_rows.data_ptr<int64_t>();
    a.mix_w = mix_w.data_ptr<float>();
    a.rest_w = rest_w.data_ptr<float>();
    a.mix_lse = mix_lse.data_ptr<float>();
    check_launch(kvstore::cluster::wave_mix_launch(a, c10::cuda::getCurrentCUDAStream()), "wave_mix");
    return {pick_rows, pick_local, pick_w, pick_d, pick_ref, n_valid, mix_rows, mix_w, rest_w, mix_lse};
}

// pick_part f32 [G, c1, Hg, Dv], mix_part f32 [G, c2, Hg, Dv], pick_d / pick_ref / mix_lse / rest_w f32
// [G, Hg], value_mean f32 [G, Dv], q [G, Hg, D], steady_k [G, S, D] / steady_v [G, S, Dv] (one dtype),
// steady_len int64 [G] -> (o f32 [G, Hg, Dv], lse f32 [G, Hg]).
std::tuple<torch::Tensor, torch::Tensor> wave_combine(const torch::Tensor& pick_part, const torch::Tensor& mix_part,
                                                      const torch::Tensor& pick_d, const torch::Tensor& pick_ref,
                                                      const torch::Tensor& mix_lse, const torch::Tensor& rest_w,
                                                      const torch::Tensor& value_mean, const torch::Tensor& q,
                                                      const torch::Tensor& steady_k, const torch::Tensor& steady_v,
                                                      const torch::Tensor& steady_len, double scale) {
    const torch::Device dev = pick_part.device();
    check(pick_part, "pick_part", torch::kFloat32, 4, dev);
    const int64_t G = pick_part.size(0), Hg = pick_part.size(2), Dv = pick_part.size(3);
    check(mix_part, "mix_part", torch::kFloat32, 4, dev);
    TORCH_CHECK(mix_part.size(0) == G && mix_part.size(2) == Hg && mix_part.size(3) == Dv,
                "mix_part must be [G, chunks, Hg, Dv] like pick_part");
    for (auto [x, name] : {std::pair{&pick_d, "pick_d"}, {&pick_ref, "pick_ref"}, {&mix_lse, "mix_lse"},
                           {&rest_w, "rest_w"}}) {
        check(*x, name, torch::kFloat32, 2, dev);
        check_shape(*x, name, {G, Hg});
    }
    check(value_mean, "value_mean", torch::kFloat32, 2, dev);
    check_shape(value_mean, "value_mean", {G, Dv});
    for (auto [x, name] : {std::pair{&q, "q"}, {&steady_k, "steady_k"}, {&steady_v, "steady_v"}}) {
        TORCH_CHECK(x->is_cuda() && x->device() == dev && x->is_contiguous() && x->dim() == 3,
                    name, " must be a contiguous 3-d CUDA tensor on ", dev);
    }
    const int64_t D = q.size(2), S = steady_k.size(1);
    check_shape(q, "q", {G, Hg, D});
    check_shape(steady_k, "steady_k", {G, S, D});
    check_shape(steady_v, "steady_v", {G, S, Dv});
    TORCH_CHECK(steady_k.scalar_type() == steady_v.scalar_type(), "steady_k and steady_v must have one dtype");
    check(steady_len, "steady_len", torch::kInt64, 1, dev);
    check_shape(steady_len, "steady_len", {G});
    TORCH_CHECK(Dv >= 1 && Dv <= kvstore::cluster::kStepMaxDv && D >= 1 && D <= kvstore::cluster::kStepMaxD &&
                    Hg >= 1 && G * Hg <= INT32_MAX,
                "unsupported sizes G=", text(G), " Hg=", text(Hg), " D=", text(D), " Dv=", text(Dv));
    TORCH_CHECK(pick_part.size(1) >= 1 && mix_part.size(1) >= 1, "pick_part and mix_part need a chunk");
    TORCH_CHECK(std::isfinite(scale), "scale must be finite");
    const c10::cuda::CUDAGuard guard(dev);
    auto f32 = pick_part.options();
    torch::Tensor o = torch::empty({G, Hg, Dv}, f32), lse = torch::empty({G, Hg}, f32);
    kvstore::cluster::CombineArgs a{pick_part.data_ptr<float>(), pick_part.size(1), mix_part.data_ptr<float>(),
                                    mix_part.size(1), pick_d.data_ptr<float>(), pick_ref.data_ptr<float>(),
                                    mix_lse.data_ptr<float>(), rest_w.data_ptr<float>(),
                                    value_mean.data_ptr<float>(), q.data_ptr(), kernel_dtype(q.scalar_type(), "q"),
                                    steady_k.data_ptr(), steady_v.data_ptr(),
                                    kernel_dtype(steady_k.scalar_type(), "steady_k"),
                                    steady_len.data_ptr<int64_t>(), S, static_cast<int>(G), static_cast<int>(Hg),
                                    static_cast<int>(D), static_cast<int>(Dv), static_cast<float>(scale),
                                    o.data_ptr<float>(), lse.data_ptr<float>()};
    check_launch(kvstore::cluster::wave_combine_launch(a, c10::cuda::getCurrentCUDAStream()), "wave_combine");
    return {o, lse};
}

}  // namespace

void register_wave_step(pybind11::module_& m) {
    m.def("wave_zones", &wave_zones, pybind11::arg("probs"), pybind11::arg("sizes"), pybind11::arg("scores"),
          pybind11::arg("offsets"), pybind11::arg("slot_base"), pybind11::arg("budget"), pybind11::arg("cand_tokens"),
          pybind11::arg("est_tokens"), pybind11::arg("r"), pybind11::arg("e"), pybind11::arg("team") = 0,
          "the wave step's zones: (cand, run_row, run_len, run_pos, cand_low, est, rest_lse, low_lse)");
    m.def("wave_mix", &wave_mix, pybind11::arg("tok_scores"), pybind11::arg("run_lse"), pybind11::arg("run_row"),
          pybind11::arg("run_len"), pybind11::arg("run_pos"), pybind11::arg("cand_low"), pybind11::arg("cand"),
          pybind11::arg("est"), pybind11::arg("scores"), pybind11::arg("sizes"), pybind11::arg("rest_lse"),
          pybind11::arg("low_lse"), pybind11::arg("slot_base"), pybind11::arg("tokens"), pybind11::arg("tokens_all"),
          pybind11::arg("t"), pybind11::arg("calibrate"), pybind11::arg("rest"), pybind11::arg("team") = 0,
          "the wave step's exact tokens and mixture weights: (pick_rows, pick_local, pick_w, pick_d, pick_ref, "
          "n_valid, mix_rows, mix_w, rest_w, mix_lse)");
    m.def("wave_team_size", &wave_team_size, pybind11::arg("G"),
          "blocks a slot the zone and mix kernels take for G slots on the current CUDA device");
    m.def("wave_combine", &wave_combine, pybind11::arg("pick_part"), pybind11::arg("mix_part"),
          pybind11::arg("pick_d"), pybind11::arg("pick_ref"), pybind11::arg("mix_lse"), pybind11::arg("rest_w"),
          pybind11::arg("value_mean"), pybind11::arg("q"), pybind11::arg("steady_k"), pybind11::arg("steady_v"),
          pybind11::arg("steady_len"), pybind11::arg("scale"),
          "the wave step's output from its parts and the steady zone: (o f32 [G, Hg, Dv], lse f32 [G, Hg])");
}
