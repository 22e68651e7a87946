// Segmented spherical k-means of the wave index (RetroInfer).
//
// The keys of one build call are centred by their mean, split into segments
// of `segment_len` consecutive tokens (a last segment shorter than
// 2 * tokens_per_cluster joins the previous one), and each segment s of n_s
// tokens is clustered on its own into C_s = max(1, round(n_s / tokens_per_cluster))
// clusters:
//   init: C_s evenly strided tokens of the segment (the stride phase comes
//         from splitmix64(seed + s));
//   `iters` times: assign each token to the argmax inner product with the
//         L2-normalised centroids (ties: lowest cluster id), then set each
//         centroid to the mean of its members (normalised at the next
//         assignment); a cluster left empty takes the token farthest from the
//         ray of its own centroid (||x||^2 - max(x.c, 0)^2, largest first, ties
//         by lowest token index), one distinct token per empty cluster in
//         cluster order;
//   final pass: assign once more with the normalised centroids; each
//         centroid then becomes the plain mean of its members' original
//         (un-centred) keys, and clusters left empty are removed.
// Clusters are numbered consecutively, segment by segment. The result does not
// depend on the number of threads. kvstore/wave.py's torch path implements
// the same algorithm for CUDA tensors: keep the two in step.
#pragma once

#include <cstdint>
#include <vector>

namespace kvstore {

struct KMeansParams {
    int tokens_per_cluster = 16;
    std::int64_t segment_len = 8192;
    int iters = 10;
    std::uint64_t seed = 0;
    int num_threads = 0;  // 0: OpenMP default
};

struct KMeansResult {
    std::vector<std::int32_t> assign;               // [n] global cluster id of each token
    std::vector<float> centroids;                   // [C, d] plain means of the members' keys
    std::vector<float> sizes;                       // [C] member counts (float32, exact up to 2^24)
    std::vector<std::int64_t> segment_of_cluster;   // [C] segment (of this call) each cluster belongs to
    std::int64_t num_clusters() const { return static_cast<std::int64_t>(sizes.size()); }
};

// Segment bounds of n tokens: {0, b_1, ..., n} (size = segments + 1).
std::vector<std::int64_t> kmeans_segment_bounds(std::int64_t n, int tokens_per_cluster, std::int64_t segment_len);

// Clusters of a segment of n_s tokens: max(1, round-half-up(n_s / tokens_per_cluster)).
std::int64_t kmeans_clusters_for(std::int64_t n_s, int tokens_per_cluster);

// keys [n, d] row-major float32 (finite). Throws std::invalid_argument on bad parameters.
KMeansResult segmented_kmeans(const float* keys, std::int64_t n, int d, const KMeansParams& p);

}  // namespace kvstore
