"""A thin CUDA runtime binding for the native TensorRT backend (cuda-python's `cuda.bindings.runtime`).

Only what the backend needs: the device's name and compute capability, device buffers, one stream and
host<->device copies on it. Every call's status is checked; a failure raises `CudaError` naming the
call and CUDA's own error name. Imported lazily: `import stableembed` never loads CUDA.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

import numpy as np


class CudaError(RuntimeError):
    """A CUDA runtime call failed (or no usable GPU/driver is present)."""


def cudart() -> ModuleType:
    """cuda-python's runtime module: `cuda.bindings.runtime` (cuda-python >= 12.6) or `cuda.cudart` (older)."""
    try:
        from cuda.bindings import runtime

        return runtime
    except ImportError:
        pass
    try:
        from cuda import cudart as runtime  # cuda-python < 12.6

        return runtime
    except ImportError as exc:
        raise ImportError("the native TensorRT backend needs cuda-python (the CUDA runtime binding), which is not "
                          "installed; install the extra: pip install 'stableembed[tensorrt]'") from exc


def _error_text(rt: ModuleType, err) -> str:
    try:
        name = rt.cudaGetErrorName(err)[1]
        text = rt.cudaGetErrorString(err)[1]
        name = name.decode() if isinstance(name, bytes) else str(name)
        text = text.decode() if isinstance(text, bytes) else str(text)
        return f"{name} ({text})"
    except Exception:  # noqa: BLE001 - the error text is best effort
        return str(err)


def check(rt: ModuleType, what: str, result):
    """cuda-python calls return (status, *values): raise on a bad status, return the value(s)."""
    if not isinstance(result, tuple):
        result = (result,)
    err, values = result[0], result[1:]
    if err != rt.cudaError_t.cudaSuccess:
        raise CudaError(f"CUDA call {what} failed: {_error_text(rt, err)}")
    if not values:
        return None
    return values[0] if len(values) == 1 else values


@dataclass(frozen=True)
class DeviceInfo:
    index: int
    name: str
    compute_capability: str  # "major.minor", e.g. "9.0"
    total_memory: int


def device_info(device: int | None = None) -> DeviceInfo:
    """Name and compute capability of `device` (default: the current one); CudaError where no GPU is usable."""
    rt = cudart()
    count = check(rt, "cudaGetDeviceCount", rt.cudaGetDeviceCount())
    if not count:
        raise CudaError("no CUDA GPU is visible to this process")
    if device is None:
        device = check(rt, "cudaGetDevice", rt.cudaGetDevice())
    prop = check(rt, "cudaGetDeviceProperties", rt.cudaGetDeviceProperties(device))
    name = prop.name.decode(errors="replace") if isinstance(prop.name, bytes) else str(prop.name)
    return DeviceInfo(int(device), name.split("\x00", 1)[0].strip(), f"{prop.major}.{prop.minor}",
                      int(prop.totalGlobalMem))


class DeviceBuffer:
    """`nbytes` of device memory (cudaMalloc), freed by `free()` or when garbage-collected."""

    def __init__(self, nbytes: int):
        self._rt = cudart()
        self.nbytes = int(nbytes)
        self.ptr: int = int(check(self._rt, f"cudaMalloc({self.nbytes})", self._rt.cudaMalloc(max(self.nbytes, 1))))

    def free(self) -> None:
        if self.ptr:
            ptr, self.ptr = self.ptr, 0
            check(self._rt, "cudaFree", self._rt.cudaFree(ptr))

    def __del__(self) -> None:
        try:
            self.free()
        except Exception:  # noqa: BLE001 - interpreter shutdown or a dead context
            pass


class Stream:
    """One CUDA stream; `handle` is the integer TensorRT's execute_async_v3 takes."""

    def __init__(self):
        self._rt = cudart()
        self._stream = check(self._rt, "cudaStreamCreate", self._rt.cudaStreamCreate())
        self.handle = int(self._stream)

    def to_device(self, dst: DeviceBuffer, array: np.ndarray) -> None:
        array = np.ascontiguousarray(array)
        if array.nbytes > dst.nbytes:
            raise ValueError(f"{array.nbytes} bytes do not fit a device buffer of {dst.nbytes}")
        check(self._rt, "cudaMemcpyAsync(host->device)", self._rt.cudaMemcpyAsync(
            dst.ptr, array.ctypes.data, array.nbytes, self._rt.cudaMemcpyKind.cudaMemcpyHostToDevice, self._stream))

    def to_host(self, array: np.ndarray, src: DeviceBuffer) -> None:
        if not array.flags.c_contiguous or array.nbytes > src.nbytes:
            raise ValueError("the host array must be C-contiguous and no larger than the device buffer")
        check(self._rt, "cudaMemcpyAsync(device->host)", self._rt.cudaMemcpyAsync(
            array.ctypes.data, src.ptr, array.nbytes, self._rt.cudaMemcpyKind.cudaMemcpyDeviceToHost, self._stream))

    def synchronize(self) -> None:
        check(self._rt, "cudaStreamSynchronize", self._rt.cudaStreamSynchronize(self._stream))

    def destroy(self) -> None:
        if self._stream is not None:
            stream, self._stream = self._stream, None
            check(self._rt, "cudaStreamDestroy", self._rt.cudaStreamDestroy(stream))

    def __del__(self) -> None:
        try:
            self.destroy()
        except Exception:  # noqa: BLE001
            pass
