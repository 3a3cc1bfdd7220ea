"""Native TensorRT backend: the engines `stableembed build-trt` put into the artifact, run with
execute_async_v3 on named tensors through cuda-python.

NOT RUN ON A GPU YET: this module was written against TensorRT's and cuda-python's documented Python
APIs and its pure parts (manifest section, engine check, routing) are tested on CPU; the engine path
itself has not executed anywhere. See README, "GPU (TensorRT / CUDA) — untested on a GPU".

Which engine runs a batch (`route`), decided by its shape alone:
  - a batch whose (rows, length) is one of the manifest's fixed buckets runs in the static engine for
    that length with the smallest batch >= rows; missing rows are filled with copies of the first row
    (as the encoder fills partial fixed batches) and dropped from the result. With the default plan
    (one static engine per length, at that length's largest bucket batch) every text of a length
    bucket runs in one engine at one shape, whatever its companions: invariant by construction;
  - any other shape runs in the dynamic engine, in the first optimization profile that holds it.
Engines only run where they were built: the TensorRT version, GPU name and compute capability recorded
in the manifest must match this machine's, or loading raises `EngineMismatchError`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..manifest import ArtifactError, Manifest
from ._shapes import Profile, pad_rows

SECTION = "tensorrt"


class EngineMismatchError(RuntimeError):
    """The artifact's TensorRT engines were built for another TensorRT version or GPU."""


@dataclass(frozen=True)
class EngineSet:
    """The manifest's "tensorrt" section, checked."""

    tensorrt_version: str
    gpu: str
    compute_capability: str
    precision: str
    distributive_independence: bool
    static: dict[tuple[int, int], str]  # (batch, length) -> engine file
    dynamic: str | None
    profiles: tuple[Profile, ...]
    raw: dict[str, Any]


def _pair(value: Any, what: str) -> tuple[int, int]:
    if not (isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, int) for v in value)):
        raise ArtifactError(f"manifest {SECTION} section: {what} must be [batch, length], got {value!r}")
    return int(value[0]), int(value[1])


def read_section(raw_manifest: dict[str, Any]) -> EngineSet | None:
    """The checked "tensorrt" section of a manifest, or None when the artifact has no engines."""
    sec = raw_manifest.get(SECTION)
    if sec is None:
        return None
    try:
        static: dict[tuple[int, int], str] = {}
        dynamic, profiles = None, ()
        for eng in sec["engines"]:
            if eng["file"] not in raw_manifest.get("files", {}):
                raise ArtifactError(f"manifest {SECTION} section names {eng['file']!r}, which is not among its files")
            if eng["kind"] == "static":
                static[_pair(eng["shape"], "a static engine's shape")] = eng["file"]
            elif eng["kind"] == "dynamic":
                if dynamic is not None:
                    raise ArtifactError(f"manifest {SECTION} section lists two dynamic engines")
                dynamic = eng["file"]
                profiles = tuple(Profile(_pair(p["min"], "min"), _pair(p["opt"], "opt"), _pair(p["max"], "max"))
                                 for p in eng["profiles"])
                if not profiles:
                    raise ArtifactError(f"manifest {SECTION} section: the dynamic engine has no profiles")
            else:
                raise ArtifactError(f"manifest {SECTION} section: unknown engine kind {eng['kind']!r}")
        return EngineSet(str(sec["tensorrt_version"]), str(sec["gpu"]), str(sec["compute_capability"]),
                         str(sec["precision"]), bool(sec["distributive_independence"]), static, dynamic,
                         profiles, sec)
    except (KeyError, TypeError) as exc:
        raise ArtifactError(f"manifest {SECTION} section is missing or has a bad field: {exc!r}") from exc


def engine_mismatch(engines: EngineSet, tensorrt_version: str, gpu: str, compute_capability: str) -> str | None:
    """None when the engines were built with this TensorRT on this kind of GPU; else what differs."""
    diffs = []
    if engines.tensorrt_version != tensorrt_version:
        diffs.append(f"TensorRT {engines.tensorrt_version} vs {tensorrt_version} here")
    if engines.gpu != gpu:
        diffs.append(f"GPU {engines.gpu!r} vs {gpu!r} here")
    if engines.compute_capability != compute_capability:
        diffs.append(f"compute capability {engines.compute_capability} vs {compute_capability} here")
    return "; ".join(diffs) or None


def check_engines(engines: EngineSet, folder: Path, tensorrt_version: str, gpu: str, compute_capability: str) -> None:
    diff = engine_mismatch(engines, tensorrt_version, gpu, compute_capability)
    if diff:
        raise EngineMismatchError(
            f"the TensorRT engines in {folder} were built with TensorRT {engines.tensorrt_version} on "
            f"{engines.gpu} (compute capability {engines.compute_capability}); this machine has TensorRT "
            f"{tensorrt_version} on {gpu} (compute capability {compute_capability}) [{diff}]. A TensorRT engine "
            f"only runs where it was built: rebuild them here with `stableembed build-trt {folder} --rebuild` "
            f"(or, in a deployment script, `stableembed build-trt {folder} --if-stale`, which rebuilds only "
            f"engines that do not match this machine)")


def route(rows: int, length: int, engines: EngineSet,
          fixed_buckets: Sequence[tuple[int, int]]) -> tuple[str, Any]:
    """("static", (batch, length)) or ("dynamic", profile_index) for a batch of `rows` x `length` tokens."""
    if (rows, length) in set(map(tuple, fixed_buckets)):
        fits = sorted(b for b, t in engines.static if t == length and b >= rows)
        if fits:
            return "static", (fits[0], length)
    if engines.dynamic is not None:
        for i, p in enumerate(engines.profiles):
            if p.holds(rows, length):
                return "dynamic", i
    have = ", ".join(f"{p.min[0]}..{p.max[0]} rows x {p.min[1]}..{p.max[1]} tokens" for p in engines.profiles)
    raise ValueError(f"a batch of {rows} rows x {length} tokens fits no TensorRT engine of this artifact "
                     f"(dynamic profiles: {have or 'none'}; static shapes: "
                     f"{', '.join(f'{b}x{t}' for b, t in sorted(engines.static)) or 'none'}); use a smaller "
                     f"batch_size or rebuild with wider --profiles")


def _require_tensorrt():
    from ..._extras import require

    trt = require("tensorrt", "tensorrt")
    if int(trt.__version__.split(".")[0]) < 10:
        raise ImportError(f"stableembed needs TensorRT >= 10 (execute_async_v3, int64 inputs); found "
                          f"{trt.__version__}: pip install 'stableembed[tensorrt]'")
    return trt


class _Context:
    def __init__(self, engine, context, inputs: list[str], output: str):
        self.engine, self.context, self.inputs, self.output = engine, context, inputs, output


class TrtBackend:
    """Runs each batch in the static or dynamic engine `route` picks; one stream, buffers sized once."""

    def __init__(self, manifest: Manifest, engines: EngineSet, trt):
        from ._cuda import DeviceBuffer, Stream

        self.name = "tensorrt"
        self.engines = engines
        self.fixed_buckets = manifest.fixed_buckets
        self.output_name = manifest.output
        self.dim = manifest.dim
        self.stream = Stream()
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self._static: dict[tuple[int, int], _Context] = {}
        self._dynamic: list[_Context] = []
        for shape, file in engines.static.items():
            engine = self._load(manifest.folder / file)
            self._static[shape] = self._context(trt, engine, engine.create_execution_context())
        if engines.dynamic is not None:
            engine = self._load(manifest.folder / engines.dynamic)
            if engine.num_optimization_profiles != len(engines.profiles):
                raise ArtifactError(f"{engines.dynamic} has {engine.num_optimization_profiles} optimization "
                                    f"profiles, the manifest lists {len(engines.profiles)}")
            for i in range(len(engines.profiles)):
                ctx = engine.create_execution_context()
                if ctx is None:
                    raise RuntimeError("TensorRT could not create an execution context (out of GPU memory?)")
                # Returns False (and logs why) when the profile cannot be selected: then every batch this
                # context ran would use the wrong shape ranges, so refuse here rather than at run time.
                if not ctx.set_optimization_profile_async(i, self.stream.handle):
                    raise RuntimeError(f"TensorRT refused optimization profile {i} of {engines.dynamic} "
                                       f"(see its log above); rebuild with `stableembed build-trt "
                                       f"{manifest.folder} --rebuild`")
                self._dynamic.append(self._context(trt, engine, ctx))
            self.stream.synchronize()
        shapes = list(engines.static) + [p.max for p in engines.profiles]
        max_rows = max(b for b, _ in shapes)
        max_tokens = max(b * t for b, t in shapes)
        self._in = {name: DeviceBuffer(max_tokens * 8) for name in manifest.inputs}
        self._out = DeviceBuffer(max_rows * manifest.dim * 4)

    def _load(self, path: Path):
        engine = self._runtime.deserialize_cuda_engine(path.read_bytes())
        if engine is None:
            raise RuntimeError(f"TensorRT could not deserialize {path.name} (see TensorRT's log above); "
                               f"rebuild with `stableembed build-trt {path.parent} --rebuild`")
        return engine

    def _context(self, trt, engine, context) -> _Context:
        if context is None:
            raise RuntimeError("TensorRT could not create an execution context (out of GPU memory?)")
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if outputs != [self.output_name]:
            raise ArtifactError(f"engine outputs {outputs}, the manifest says {self.output_name!r}")
        # run() copies the output back as float32 bytes: an engine whose output is another type (an fp16
        # build without the float32 output Cast, say) would be read as garbage, so refuse it here.
        if engine.get_tensor_dtype(outputs[0]) != trt.DataType.FLOAT:
            raise ArtifactError(f"engine output {outputs[0]!r} is {engine.get_tensor_dtype(outputs[0])}, expected "
                                f"float32 (DataType.FLOAT); rebuild with `stableembed build-trt --rebuild`")
        for n in inputs:
            if engine.get_tensor_dtype(n) != trt.DataType.INT64:
                raise ArtifactError(f"engine input {n!r} is {engine.get_tensor_dtype(n)}, expected int64")
        return _Context(engine, context, inputs, outputs[0])

    def run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        rows, length = feeds["input_ids"].shape
        kind, key = route(rows, length, self.engines, self.fixed_buckets)
        if kind == "static":
            feeds = pad_rows(feeds, key[0])
            ctx = self._static[key]
        else:
            ctx = self._dynamic[key]
        c = ctx.context
        for name in ctx.inputs:
            arr = np.ascontiguousarray(feeds[name], dtype=np.int64)
            self.stream.to_device(self._in[name], arr)
            if not c.set_input_shape(name, arr.shape):
                raise RuntimeError(f"TensorRT refused input shape {arr.shape} for {name!r}")
            c.set_tensor_address(name, self._in[name].ptr)
        c.set_tensor_address(ctx.output, self._out.ptr)
        want = (feeds["input_ids"].shape[0], self.dim)  # rows after filling
        out = np.empty(tuple(c.get_tensor_shape(ctx.output)), dtype=np.float32)
        if out.shape != want or out.nbytes > self._out.nbytes:
            raise RuntimeError(f"TensorRT reports output shape {out.shape} for a {want[0]}x{length} batch; "
                               f"expected {want}")
        if not c.execute_async_v3(self.stream.handle):
            raise RuntimeError("TensorRT execute_async_v3 failed (see TensorRT's log above)")
        self.stream.to_host(out, self._out)
        self.stream.synchronize()
        return out[:rows]


def load(manifest: Manifest, provider: str, threads: int | None) -> TrtBackend:
    """The native backend for an artifact with engines (`read_section(manifest.raw)` is not None).

    Engines built for another TensorRT or GPU are refused; rebuilding is the export side's job
    (`stableembed build-trt ARTIFACT --rebuild` or `--if-stale`): the runtime never imports export."""
    engines = read_section(manifest.raw)
    if engines is None:
        raise ArtifactError(f"{manifest.folder} has no TensorRT engines: build them with "
                            f"`stableembed build-trt {manifest.folder}`")
    trt = _require_tensorrt()
    from ._cuda import device_info

    dev = device_info()
    check_engines(engines, manifest.folder, trt.__version__, dev.name, dev.compute_capability)
    return TrtBackend(manifest, engines, trt)
