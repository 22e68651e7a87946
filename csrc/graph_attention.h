// The CPU half of RetrievalAttention's CPU/GPU split for one layer: for every
// head slot (sequence x KV head) one graph search for the slot's group of
// query heads, then each query head's exact partial attention over its own
// top-k keys among the keys that search found.
//
// The partials (o, lse) merge with the GPU's steady-zone partial by the
// log-sum-exp rule; only queries and partials cross the bus.
#pragma once

#include <cstdint>
#include <vector>

#include "graph_index.h"

namespace kvstore {

// One head slot: its graph and the rows the graph's ids point into.
struct GraphSlot {
    const GraphIndex* index = nullptr;  // searched under its own read lock
    const float* keys = nullptr;        // [n, dim], row i = key of graph id i
    const float* values = nullptr;      // [n, dv], row i = value of graph id i
    std::int64_t n = 0;                 // rows of keys and values (>= ids the graph returns)
};

struct GraphAttentionParams {
    int top_k = 100;         // keys each query head attends
    int group_k = 0;         // keys the group search keeps (0: top_k * group); each head picks its top_k among them
    int ef = 128;            // beam width (raised to group_k when smaller)
    float scale = 1.0f;      // score = scale * q.k
    int num_threads = 0;     // 0: OpenMP default
};

// queries [H, group, dim] float32, one row of `group` query heads per slot.
// Writes o [H, group, dv], lse [H, group] (natural log; -inf for a slot with
// no keys, whose o is 0), scanned [H] (keys the search read, each scored
// against every head of the group) and, when out_ids is not null,
// ids [H, group, top_k]: each head's attended graph ids by descending score
// (ties: smaller id first), -1 padded.
// Throws std::invalid_argument on inconsistent arguments and
// std::out_of_range when a graph returns an id >= the slot's n.
void graph_attention(const std::vector<GraphSlot>& slots, const float* queries, int group, int dim, int dv,
                     const GraphAttentionParams& p, float* out_o, float* out_lse, std::int64_t* out_scanned,
                     std::int64_t* out_ids);

}  // namespace kvstore
