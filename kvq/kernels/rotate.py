"""Row-by-row matrix product for rotations: each row's result is computed the same way
whatever the batch, so a token rotated alone equals the token rotated with others (BLAS may
pick different summation orders for different batch sizes)."""

from numba import njit, prange


@njit(cache=True)
def rotate_row(row, rotation, target):
    """target = row @ rotation for float32 row (d,), rotation (d, d): sums in row order,
    without fastmath, so every caller gets the same float32 result."""
    d = rotation.shape[0]
    for j in range(d):
        target[j] = 0.0
    for i in range(d):
        value = row[i]
        weights = rotation[i]
        for j in range(d):
            target[j] += value * weights[j]


@njit(parallel=True, cache=True)
def rotate_rows(x, rotation, out):
    """out[r] = x[r] @ rotation for float32 x (rows, d), rotation (d, d)."""
    for r in prange(x.shape[0]):
        rotate_row(x[r], rotation, out[r])
