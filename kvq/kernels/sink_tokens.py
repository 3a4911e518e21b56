"""The exact sink tokens of a cache, joined to the attention kernel's softmax over its codes.

The attention kernel runs without sink logits over the positions from ``stop`` on and leaves
each row's partial softmaxes (per split: running max, sum) beside its output out = N / Z.
Here, per row, the sink tokens it sees add weights w and w . v, and the GPT-OSS sink logit
joins the denominator: out = (Z out + w . v) / (Z + sum w + exp(sink)), all in float64.
One small serial loop: a decode step's rows times a few tokens.
"""

import numpy as np
from numba import njit


@njit(cache=True, fastmath={"reassoc", "contract"})
def merge_sink_tokens(
    queries, t_q, query_end, causal, window, first, stop, keys, values, sinks, part_max,
    part_sum, splits, out,
):  # fmt: skip
    """Rows of ``queries`` float32 (kv_heads, rows, head_dim), group-major (row r is query
    token r % t_q at position query_end - t_q + r % t_q), over sink tokens at positions
    first .. stop - 1 of ``keys`` and ``values`` float32 (kv_heads, n >= stop, head_dim)
    (the same basis and scale as the queries). A row sees a position p when p <= its own
    (``causal``) and p > its own - window (window > 0). sinks: float64 (kv_heads, group)
    logits (-inf: none); part_max, part_sum: float32 (kv_heads * splits, rows). Updates
    ``out`` float32 (kv_heads, rows, head_dim) in place; a row that sees nothing gets zeros.
    """
    kv_heads, rows, dim = queries.shape
    count = max(0, stop - first)
    scores = np.empty(max(count, 1), np.float64)
    row = np.empty(dim, np.float64)
    for head in range(kv_heads):
        for r in range(rows):
            position = query_end - t_q + r % t_q
            top = sinks[head, r // t_q]
            for split in range(splits):
                top = max(top, np.float64(part_max[head * splits + split, r]))
            for i in range(count):
                p = first + i
                if (causal and p > position) or (window > 0 and p <= position - window):
                    scores[i] = -np.inf
                    continue
                s = 0.0
                for d in range(dim):  # reassociated: vectorised, float64 all the same
                    s += np.float64(queries[head, r, d]) * np.float64(keys[head, p, d])
                scores[i] = s
                top = max(top, s)
            if top == -np.inf:
                for d in range(dim):
                    out[head, r, d] = 0.0
                continue
            body = 0.0
            for split in range(splits):
                m = np.float64(part_max[head * splits + split, r])
                if m > -np.inf:
                    body += np.exp(m - top) * np.float64(part_sum[head * splits + split, r])
            total = body
            if sinks[head, r // t_q] > -np.inf:
                total += np.exp(sinks[head, r // t_q] - top)
            for i in range(count):
                if scores[i] > -np.inf:
                    scores[i] = np.exp(scores[i] - top)
                    total += scores[i]
                else:
                    scores[i] = 0.0
            inverse = 1.0 / total
            # loops along the row (a loop over the few tokens per value was not vectorised)
            for d in range(dim):
                row[d] = body * np.float64(out[head, r, d])
            for i in range(count):
                weight = scores[i]
                for d in range(dim):
                    row[d] += weight * np.float64(values[head, first + i, d])
            for d in range(dim):
                out[head, r, d] = np.float32(row[d] * inverse)
