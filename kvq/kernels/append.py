"""A decode step's append: one token of K and of V checked, rotated and put in the residual.

One call instead of the dozen NumPy operations of the general path: inside a model each of
those costs tens of microseconds, as the model's matrix products evict the caches between
layers. The rotation is :func:`kvq.kernels.rotate.rotate_row`, the general path's, so a
token appended here holds the same float32 values as one appended there.
"""

import numpy as np
from numba import njit

from kvq.kernels.rotate import rotate_row


@njit(inline="always")
def _stage(new, rotation, order, limit, residual, slot, rotated, gathered):
    """residual[:, slot] = ``new`` (heads, 1, head_dim) turned by ``rotation`` (head_dim,
    head_dim; none when empty), then its channels gathered by ``order`` (heads * head_dim
    flat indices; none when empty). True when every value is finite and, as stored, at most
    ``limit`` in magnitude; otherwise False, writing nothing."""
    heads, _, dim = new.shape
    for h in range(heads):
        if rotation.shape[0] > 0:
            rotate_row(new[h, 0], rotation, rotated[h])
        else:
            rotated[h, :] = new[h, 0]
    flat = rotated.reshape(heads * dim)
    if order.shape[0] > 0:
        for i in range(heads * dim):
            gathered[i] = flat[order[i]]
    else:
        gathered[:] = flat
    # NaN fails every comparison, and a rotation carries NaN and Inf into its result
    for i in range(heads * dim):
        if not abs(gathered[i]) <= limit:
            return False
    for h in range(heads):
        for d in range(dim):
            residual[h, slot, d] = gathered[h * dim + d]
    return True


@njit(cache=True)
def stage_tokens(
    k, v, k_rotation, v_rotation, k_order, v_order, k_limit, v_limit, k_residual, v_residual,
    k_slot, v_slot,
):  # fmt: skip
    """One token of keys and of values, float32 (heads, 1, head_dim) each, into slot
    ``k_slot`` / ``v_slot`` of the float32 residuals (heads, n, head_dim) (see ``_stage``).
    Returns 0, or 1 when a key and 2 when a value is not finite or not storable."""
    heads, _, dim = k.shape
    rotated = np.empty((heads, dim), np.float32)
    gathered = np.empty(heads * dim, np.float32)
    if not _stage(k, k_rotation, k_order, k_limit, k_residual, k_slot, rotated, gathered):
        return 1
    if not _stage(v, v_rotation, v_order, v_limit, v_residual, v_slot, rotated, gathered):
        return 2
    return 0
