"""Constants of kvq's storage format, defined once (this module imports nothing from kvq).

Numba kernels read them as globals, frozen at compile time.
"""

#: Groups sharing one second-level (float16) scale and min when ``double_quant`` is on.
SUPER_GROUPS = 8
#: Bits of each group's second-level scale code and min code.
SUB_BITS = 6
#: Largest second-level code: 63.
SUB_LEVELS = (1 << SUB_BITS) - 1
#: Min codes are stored as ``mc + MIN_OFFSET`` (32), ``mc`` in [-32, 31].
MIN_OFFSET = 1 << (SUB_BITS - 1)
#: Largest finite float16, the bound on values with float16 scales and mins.
FLOAT16_MAX = 65504.0
#: Largest finite float32.
FLOAT32_MAX = 3.4028234663852886e38
