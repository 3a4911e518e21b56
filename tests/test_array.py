"""Array: zero-copy wrapping, exact transfers for every dtype and shape, devices and errors.

The tests named ``test_gpu_*`` need a GPU; where none is visible they are skipped here and
``test_device_tests_pass_on_the_cuda_simulator`` runs them on numba's CUDA simulator instead.
"""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import kvq.array
from kvq.array import Array, devices
from kvq.errors import DeviceError, KvqError

ROOT = Path(__file__).resolve().parent.parent

DTYPES = [
    "bool",
    "int8",
    "uint8",
    "int16",
    "uint16",
    "int32",
    "uint32",
    "int64",
    "uint64",
    "float16",
    "float32",
    "float64",
    "longdouble",
    "complex64",
    "complex128",
    ">f4",
    ">i8",
    ">c16",
    "datetime64[ns]",
    "timedelta64[s]",
    "S7",
    "U3",
    "V5",
    [("a", "<i2"), ("b", ">f8"), ("c", "u1", (3,))],
]
SHAPES = [(), (0,), (7,), (3, 5), (2, 3, 4), (2, 0, 3), (1, 1, 2, 1, 5)]

needs_gpu = pytest.mark.skipif("gpu" not in devices(), reason="no CUDA GPU visible to numba.cuda")


def random_bytes(rng, dtype, shape) -> np.ndarray:
    """An array of ``dtype`` and ``shape`` holding random bytes: NaN payloads, -0.0, anything."""
    dtype = np.dtype(dtype)
    count = int(np.prod(shape, dtype=np.int64))
    raw = rng.integers(0, 256, size=count * dtype.itemsize, dtype=np.uint8)
    return raw.view(dtype).reshape(shape)


def special_floats() -> list[np.ndarray]:
    """Float arrays from bit patterns that value comparisons would blur."""
    f32 = [0x7FC00001, 0x7F800001, 0xFFC12345, 0x80000000, 0x00000001, 0x7F800000, 0xFF800000]
    f64 = [0x7FF8000000000001, 0x7FF0000000000001, 0x8000000000000000, 0x0000000000000001]
    f16 = [0x7E01, 0x7C01, 0xFC01, 0x8000, 0x0001]
    return [
        np.array(f32, np.uint32).view(np.float32),
        np.array(f64, np.uint64).view(np.float64),
        np.array(f16, np.uint16).view(np.float16),
        np.array(f32, np.uint32).view(">f4"),
    ]


def assert_same_bytes(got: np.ndarray, want: np.ndarray) -> None:
    assert isinstance(got, np.ndarray)
    assert got.dtype == want.dtype
    assert got.shape == want.shape
    assert got.tobytes() == want.tobytes()


# --- CPU -------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_from_numpy_holds_the_same_memory_for_every_dtype_and_shape(rng, dtype, shape):
    a = random_bytes(rng, dtype, shape)
    x = Array.from_numpy(a)
    assert x.device == "cpu"
    assert x.numpy() is a
    assert x.to("cpu") is x
    assert np.asarray(x) is a
    assert x.shape == a.shape and x.ndim == a.ndim and x.size == a.size
    assert x.dtype == a.dtype and isinstance(x.dtype, np.dtype)
    assert x.nbytes == a.nbytes
    assert_same_bytes(np.asarray(x), a)


def test_properties_and_repr():
    a = np.zeros((8, 40, 64), np.float32)
    x = Array.from_numpy(a)
    assert x.shape == (8, 40, 64)
    assert isinstance(x.shape, tuple)
    assert x.dtype == np.dtype(np.float32)
    assert (x.size, x.ndim, x.nbytes) == (20480, 3, 81920)
    assert repr(x) == "Array(shape=(8, 40, 64), dtype=float32, device='cpu', nbytes=81,920)"
    assert "strided" in repr(Array.from_numpy(a[:, ::2]))


def test_zero_copy_both_ways():
    a = np.arange(12, dtype=np.float64).reshape(3, 4)
    x = Array.from_numpy(a)
    assert np.shares_memory(x.numpy(), a)
    assert np.shares_memory(np.asarray(x), a)
    a[1, 2] = -5.0
    assert x.numpy()[1, 2] == -5.0
    x.numpy()[0, 0] = 42.0
    assert a[0, 0] == 42.0


def test_non_contiguous_input_is_kept_as_is():
    """from_numpy never copies: a strided view stays a strided view of the same memory."""
    base = np.arange(60, dtype=np.int32).reshape(6, 10)
    for view in (base[::2, 1::3], base.T, base[:, ::-1], np.broadcast_to(base[0], (4, 10))):
        x = Array.from_numpy(view)
        assert x.numpy() is view
        assert x.numpy().strides == view.strides
        assert np.shares_memory(x.numpy(), base)
        assert x.shape == view.shape and x.nbytes == view.size * 4
        np.testing.assert_array_equal(np.asarray(x), view)


def test_read_only_input_stays_read_only():
    a = np.arange(5.0)
    a.flags.writeable = False
    x = Array.from_numpy(a)
    assert x.numpy() is a and not x.numpy().flags.writeable


@pytest.mark.parametrize("a", special_floats(), ids=lambda a: str(a.dtype))
def test_special_float_bits_survive(a):
    x = Array.from_numpy(a)
    assert_same_bytes(x.to("cpu").numpy(), a)
    assert_same_bytes(np.asarray(x), a)
    assert_same_bytes(np.array(x, copy=True), a)


def test_array_protocol_numpy2_signature():
    a = np.arange(6, dtype=np.int16).reshape(2, 3)
    x = Array.from_numpy(a)
    assert np.asarray(x) is a
    assert np.array(x, copy=False) is a
    copied = np.array(x, copy=True)
    assert not np.shares_memory(copied, a)
    np.testing.assert_array_equal(copied, a)
    as_float = np.asarray(x, dtype=np.float64)
    assert as_float.dtype == np.float64
    np.testing.assert_array_equal(as_float, a.astype(np.float64))
    with pytest.raises(ValueError):
        np.array(x, dtype=np.float64, copy=False)  # a conversion cannot avoid a copy


def test_arrays_compare_by_identity():
    a = np.zeros(3)
    assert Array.from_numpy(a) != Array.from_numpy(a)


# --- devices ---------------------------------------------------------------------------------


def test_devices_lists_cpu_and_gpu_only_when_numba_cuda_sees_one():
    from numba import cuda

    assert devices()[0] == "cpu"
    assert devices() == (["cpu", "gpu"] if cuda.is_available() else ["cpu"])
    assert isinstance(devices(), list)


def test_gpu_check_runs_once(monkeypatch):
    from numba import cuda

    calls = []
    monkeypatch.setattr(cuda, "is_available", lambda: calls.append(1) or False)
    kvq.array._gpu_available.cache_clear()
    try:
        assert devices() == ["cpu"]
        assert devices() == ["cpu"]
        with pytest.raises(DeviceError):
            Array.from_numpy(np.zeros(2)).to("gpu")
        assert len(calls) == 1
    finally:
        kvq.array._gpu_available.cache_clear()


def test_to_gpu_without_a_gpu_raises_device_error(monkeypatch):
    monkeypatch.setattr(kvq.array, "_gpu_available", lambda: False)
    x = Array.from_numpy(np.arange(4.0))
    with pytest.raises(DeviceError) as info:
        x.to("gpu")
    message = str(info.value)
    assert "no CUDA GPU is visible to numba.cuda" in message
    assert "['cpu']" in message
    assert isinstance(info.value, RuntimeError) and isinstance(info.value, KvqError)


@pytest.mark.skipif("gpu" in devices(), reason="a GPU is visible")
def test_to_gpu_on_this_machine_raises_device_error():
    with pytest.raises(DeviceError, match=r"kvq.devices\(\) is \['cpu'\]"):
        Array.from_numpy(np.arange(4.0)).to("gpu")


@pytest.mark.parametrize("device", ["tpu", "GPU", "cuda", "", None, 0], ids=repr)
def test_unknown_device_raises_value_error(device):
    x = Array.from_numpy(np.zeros(2))
    with pytest.raises(ValueError) as info:
        x.to(device)
    assert repr(device) in str(info.value)
    assert "['cpu', 'gpu']" in str(info.value)


def test_import_does_not_load_numba_cuda():
    code = "import sys, kvq, kvq.array; print('numba.cuda' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "False"


# --- bad input -------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [[1.0, 2.0], 3.0, (1, 2), None, "abc"], ids=repr)
def test_from_numpy_refuses_non_arrays(value):
    with pytest.raises(TypeError) as info:
        Array.from_numpy(value)
    assert type(value).__name__ in str(info.value)
    assert "np.asarray" in str(info.value)


def test_from_numpy_refuses_object_dtypes():
    for a in (np.array([1, "x"], dtype=object), np.zeros(2, [("a", "f4"), ("b", "O")])):
        with pytest.raises(TypeError, match="Python objects"):
            Array.from_numpy(a)


def test_constructor_checks_data_and_device():
    with pytest.raises(TypeError, match="NumPy array, got list"):
        Array([1, 2], "cpu")
    with pytest.raises(ValueError, match="'tpu'"):
        Array(np.zeros(2), "tpu")


# --- GPU (real, or numba's simulator through the test below) ---------------------------------


@needs_gpu
def test_gpu_round_trip_is_exact(rng):
    """Every dtype and shape (one test, so a machine without a GPU reports one skip)."""
    for dtype in DTYPES:
        for shape in SHAPES:
            a = random_bytes(rng, dtype, shape)
            g = Array.from_numpy(a).to("gpu")
            assert g.device == "gpu"
            assert (g.shape, g.dtype, g.size, g.ndim, g.nbytes) == (
                a.shape,
                a.dtype,
                a.size,
                a.ndim,
                a.nbytes,
            )
            host = g.numpy()
            assert_same_bytes(host, a)
            assert not np.shares_memory(host, a)
            back = g.to("cpu")
            assert back.device == "cpu"
            assert_same_bytes(back.numpy(), a)
            assert_same_bytes(np.asarray(g), a)


@needs_gpu
def test_gpu_special_float_bits_survive():
    for a in special_floats():
        assert_same_bytes(Array.from_numpy(a).to("gpu").to("cpu").numpy(), a)


@needs_gpu
def test_gpu_non_contiguous_input_arrives_c_contiguous():
    base = np.arange(60, dtype=np.float32).reshape(6, 10)
    for view in (base[::2, 1::3], base.T, base[:, ::-1], np.broadcast_to(base[0], (4, 10))):
        host = Array.from_numpy(view).to("gpu").numpy()
        assert host.flags.c_contiguous
        assert_same_bytes(host, np.ascontiguousarray(view))


@needs_gpu
def test_gpu_array_behaviour():
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    g = Array.from_numpy(a).to("gpu")
    assert g.to("gpu") is g
    assert repr(g) == "Array(shape=(2, 3), dtype=float32, device='gpu', nbytes=24)"
    a[0, 0] = 99.0  # the device copy is independent of the host array
    assert g.numpy()[0, 0] == 0.0
    assert np.asarray(g, dtype=np.float64).dtype == np.float64
    with pytest.raises(ValueError, match="copy=False"):
        np.array(g, copy=False)
    wrapped = Array(g.data, "gpu")
    assert_same_bytes(wrapped.numpy(), g.numpy())


@pytest.mark.skipif(
    "gpu" in devices() or os.environ.get("NUMBA_ENABLE_CUDASIM") == "1",
    reason="the device tests run directly",
)
def test_device_tests_pass_on_the_cuda_simulator():
    """Run the test_gpu_* tests in a fresh process on numba's CUDA simulator."""
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "test_gpu_"]
    result = subprocess.run(
        [*command, str(Path(__file__))], cwd=ROOT, env=env, capture_output=True, text=True
    )
    tail = result.stdout[-3000:] + result.stderr[-3000:]
    assert result.returncode == 0, tail
    assert " passed" in tail and "skipped" not in tail and "failed" not in tail, tail
