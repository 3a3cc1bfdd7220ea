"""onnxruntime's CUDA and TensorRT execution providers (needs onnxruntime-gpu: the `gpu` extra).

STATUS. The CUDA EP path is exercised by benchmarks/gpu_check.py, which has not yet run on a GPU (see
README, GPU). The TensorRT EP path is written against onnxruntime's documented TensorRT EP options and
is UNTESTED ON A GPU: TensorRT cannot be installed in any environment this project has. Option builders
and shape routing are tested on CPU (tests/runtime/test_gpu_backends.py).

Shapes (backends/_shapes.py): a batch whose (rows, length) is a fixed bucket runs at its length's run
shape (the largest bucket batch of that length), filled with copies of its first row; other batches
(dynamic mode) run at their own shape.

Session layout: one session per run shape, plus one dynamic session.
  - CUDA EP: a run-shape session has its free dimensions pinned to that shape (shape arithmetic folds
    to constants) and, by default, CUDA graphs with IO binding; the dynamic session is plain. Every
    session has TF32 off (`use_tf32=0`) and deterministic compute on.
  - TensorRT EP: onnxruntime's TensorRT EP only ever runs optimization profile 0 of a session
    (multiple profiles: onnxruntime PR #31624, open; issue #23965), so each session gets exactly one
    profile: an exact profile (min = opt = max) for a run-shape session, `default_profiles`' single
    range for the dynamic session. A dynamic batch outside that range is refused with a clear error.
    Each session caches its engine in its own folder under $STABLEEMBED_CACHE (default
    ~/.cache/stableembed)/ort-trt/<model sha256>/ (onnxruntime names cached engines by graph, not by
    profile, and rebuilds on a profile mismatch: a shared folder would thrash); the timing cache is
    shared. TF32: this EP has no option to clear it (onnxruntime issue #26029); only the process-wide
    NVIDIA_TF32_OVERRIDE=0, set before the process creates its first CUDA context, turns it off. So
    the TensorRT EP is NOT held to the fp32 parity tolerance: what it promises is fixed-mode bit
    identity within one process and engine, and parity within TF32's error (`TRT_EP_TOLERANCE`).
A provider onnxruntime cannot start raises; nothing falls back to the CPU.
"""

from __future__ import annotations

import os
import threading
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import onnxruntime as ort

from ..manifest import Manifest
from ..stamps import cache_root
from ._shapes import Profile, Shape, default_profiles, fixed_shape, pad_rows
from .onnxruntime import session_options

ORT_PROVIDERS = {"cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}
# What the TensorRT EP can be held to against the CPU provider when TF32 may be on (10-bit mantissa
# inputs to every fp32 MatMul): min cosine, max |diff| per component. fp32 paths without TF32 are held
# to the project's parity tolerance (cosine >= 0.99999, |diff| <= 1e-5).
TRT_EP_TOLERANCE = (0.999, 5e-3)

GPU_INSTALL = ("pip install 'stableembed[gpu]' (onnxruntime-gpu; it cannot share an environment with the "
               "onnxruntime package, which owns the same files: afterwards run `pip uninstall -y onnxruntime "
               "onnxruntime-gpu && pip install --no-deps onnxruntime-gpu`)")


def missing_provider_message(provider: str, wanted: str, available: Sequence[str], has_engines: bool = False) -> str:
    from importlib import metadata

    msg = (f"provider {provider!r} needs onnxruntime's {wanted}, which this onnxruntime does not have "
           f"(available: {', '.join(available)}); install it: {GPU_INSTALL}")
    if provider == "tensorrt" and not has_engines:
        msg = (f"provider 'tensorrt' runs the artifact's own TensorRT engines when it has them; this artifact has "
               f"none (build them with `stableembed build-trt ARTIFACT`, which needs pip install "
               f"'stableembed[tensorrt]'), so it needs onnxruntime's {wanted} instead, which this onnxruntime "
               f"does not have (available: {', '.join(available)}); install it: {GPU_INSTALL}")
    installed = []
    for dist in ("onnxruntime", "onnxruntime-gpu"):
        try:
            installed.append(f"{dist} {metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            pass
    if len(installed) == 2:
        msg += f". Both {' and '.join(installed)} are installed: they overwrite each other's files"
    return msg


def tf32_overridden_off() -> bool:
    """True when NVIDIA_TF32_OVERRIDE=0 is in this process's environment. It only takes effect if it was
    set before the process created its first CUDA context; the TensorRT EP has no other way to clear TF32."""
    return os.environ.get("NVIDIA_TF32_OVERRIDE") == "0"


def cache_dir(manifest: Manifest) -> Path:
    return cache_root() / "ort-trt" / manifest.model_sha256[:16]  # the graph and its external weights


def cuda_options(cuda_graph: bool = False) -> dict[str, str]:
    opts = {"device_id": "0", "use_tf32": "0", "cudnn_conv_algo_search": "DEFAULT"}
    if cuda_graph:
        opts["enable_cuda_graph"] = "1"
    return opts


def shape_list(inputs: Sequence[str], shape: Shape) -> str:
    """onnxruntime's profile-shape syntax for one profile: 'input_ids:32x128,attention_mask:32x128'."""
    return ",".join(f"{name}:{shape[0]}x{shape[1]}" for name in inputs)


def session_tag(shape: Shape | None) -> str:
    """The engine cache subfolder of one TensorRT EP session: 'fixed-32x16' or 'dynamic'."""
    return "dynamic" if shape is None else f"fixed-{shape[0]}x{shape[1]}"


def tensorrt_options(manifest: Manifest, profile: Profile, tag: str) -> dict[str, str]:
    """Provider options of one TensorRT EP session with exactly one optimization profile."""
    root = cache_dir(manifest)
    return {
        "device_id": "0",
        "trt_fp16_enable": "False",
        "trt_engine_cache_enable": "True",
        "trt_engine_cache_path": str(root / tag),
        "trt_timing_cache_enable": "True",
        "trt_timing_cache_path": str(root),
        "trt_profile_min_shapes": shape_list(manifest.inputs, profile.min),
        "trt_profile_opt_shapes": shape_list(manifest.inputs, profile.opt),
        "trt_profile_max_shapes": shape_list(manifest.inputs, profile.max),
    }


def _session(manifest: Manifest, providers: list, threads: int | None,
             pin: dict[str, int] | None = None) -> ort.InferenceSession:
    so = session_options(threads)
    so.use_deterministic_compute = True
    for dim, value in (pin or {}).items():  # free dimensions -> a static shape: shape arithmetic folds away
        so.add_free_dimension_override_by_name(dim, value)
    session = ort.InferenceSession(str(manifest.model_file), so, providers=providers)
    wanted = providers[0][0]
    if session.get_providers()[0] != wanted:
        raise RuntimeError(f"onnxruntime could not start {wanted} (the session runs on "
                           f"{', '.join(session.get_providers())}); check that the CUDA, cuDNN and, for "
                           f"TensorRT, the TensorRT libraries onnxruntime-gpu needs are installed")
    return session


# onnxruntime's CUDA EP captures a CUDA graph on a thread's run after `min_num_runs_before_cuda_graph_capture_`
# regular ones (1 or 2, by version: cuda_execution_provider.h), and keeps the graph per thread. So the
# capture comes on a thread's 2nd or 3rd run, not its first; by the 3rd it has happened or failed.
CAPTURE_RUNS = 3


class _BoundRunner:
    """One run shape on the CUDA EP: inputs and output bound once on the GPU (IO binding). With CUDA
    graphs (`graph`), a thread's first call runs the session CAPTURE_RUNS times on its inputs, so that the
    capture happens (or fails) within that call, where the backend can still fall back; later calls
    replay the graph."""

    def __init__(self, session: ort.InferenceSession, manifest: Manifest, shape: Shape, graph: bool = False):
        self.session = session
        self.graph = graph
        # session runs of each thread (onnxruntime's graphs are per thread); thread-local, so a new thread
        # that reuses a finished one's id starts from 0, as onnxruntime's per-thread state does
        self._local = threading.local()
        self.inputs = {n: ort.OrtValue.ortvalue_from_shape_and_type(list(shape), np.int64, "cuda", 0)
                       for n in manifest.inputs}
        self.out = ort.OrtValue.ortvalue_from_shape_and_type([shape[0], manifest.dim], np.float32, "cuda", 0)
        self.binding = session.io_binding()
        for n, v in self.inputs.items():
            self.binding.bind_ortvalue_input(n, v)
        self.binding.bind_ortvalue_output(manifest.output, self.out)

    def capturing(self) -> bool:
        """Whether this thread's next call may still capture (and so may still fail for want of graphs)."""
        return self.graph and getattr(self._local, "runs", 0) < CAPTURE_RUNS

    def run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        for n, v in self.inputs.items():
            v.update_inplace(np.ascontiguousarray(feeds[n], dtype=np.int64))
        done = getattr(self._local, "runs", 0)
        times = CAPTURE_RUNS - done if self.graph and done < CAPTURE_RUNS else 1  # the same inputs: the same bits
        for _ in range(times):
            self.session.run_with_iobinding(self.binding)
        self._local.runs = done + times
        return self.out.numpy()


class OrtGpuBackend:
    """onnxruntime on the GPU: one session per fixed run shape (made on first use) and one dynamic session.

    cuda_graph (CUDA EP only): replay CUDA graphs in the run-shape sessions; False runs them as plain
    pinned-shape sessions (the benchmark measures both)."""

    def __init__(self, manifest: Manifest, provider: str, threads: int | None, cuda_graph: bool = True):
        if provider not in ORT_PROVIDERS:
            raise ValueError(f"OrtGpuBackend serves {', '.join(ORT_PROVIDERS)}, not {provider!r}")
        self.name = f"onnxruntime-{provider}"
        self.manifest, self.provider, self.threads = manifest, provider, threads
        self.cuda_graph = cuda_graph and provider == "cuda"
        # Whether fp32 MatMuls may run in TF32 here: never on the CUDA EP (use_tf32=0); on the TensorRT EP
        # unless NVIDIA_TF32_OVERRIDE=0 was set before the process's first CUDA context (see the docstring).
        self.tf32_possible = provider == "tensorrt" and not tf32_overridden_off()
        self._fixed: dict[Shape, _BoundRunner | ort.InferenceSession | None] = {}
        self.profile = default_profiles(manifest.max_length, manifest.fixed_buckets)[0]
        self.session = self._make_session(None)

    # ------------------------------------------------------------------------------------------ sessions

    def _make_session(self, shape: Shape | None, cuda_graph: bool = False) -> ort.InferenceSession:
        if self.provider == "tensorrt":
            tag = session_tag(shape)
            (cache_dir(self.manifest) / tag).mkdir(parents=True, exist_ok=True)
            profile = self.profile if shape is None else Profile.exact(shape)
            providers = [("TensorrtExecutionProvider", tensorrt_options(self.manifest, profile, tag)),
                         ("CUDAExecutionProvider", cuda_options())]
            return _session(self.manifest, providers, self.threads)
        pin = None
        if shape is not None:
            dims = self.session.get_inputs()[0].shape  # e.g. ['batch', 'seq']
            pin = {d: v for d, v in zip(dims, shape) if isinstance(d, str)}
        return _session(self.manifest, [("CUDAExecutionProvider", cuda_options(cuda_graph))], self.threads, pin=pin)

    def _runner(self, shape: Shape):
        if shape not in self._fixed:
            if self.provider == "tensorrt":
                self._fixed[shape] = self._make_session(shape)
            elif not self.cuda_graph:
                self._fixed[shape] = _BoundRunner(self._make_session(shape), self.manifest, shape)
            else:
                try:
                    self._fixed[shape] = _BoundRunner(self._make_session(shape, cuda_graph=True), self.manifest,
                                                      shape, graph=True)
                except Exception as exc:  # noqa: BLE001 - still on the GPU, at the same shape, without replay
                    warnings.warn(f"CUDA graphs unavailable for shape {shape} ({exc}); running it without them",
                                  RuntimeWarning, stacklevel=3)
                    self._fixed[shape] = _BoundRunner(self._make_session(shape), self.manifest, shape)
        return self._fixed[shape]

    # ------------------------------------------------------------------------------------------------ run

    def run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        rows, length = feeds["input_ids"].shape
        shape = fixed_shape(rows, length, self.manifest.fixed_buckets)
        if shape is None:
            if self.provider == "tensorrt" and not self.profile.holds(rows, length):
                p = self.profile
                raise ValueError(f"a batch of {rows} rows x {length} tokens is outside the TensorRT EP's dynamic "
                                 f"profile ({p.min[0]}..{p.max[0]} rows x {p.min[1]}..{p.max[1]} tokens); use a "
                                 f"smaller batch_size")
            return self._check(self.session.run([self.manifest.output], feeds)[0], rows)
        feeds = pad_rows(feeds, shape[0])
        runner = self._runner(shape)
        if isinstance(runner, _BoundRunner):
            capturing = runner.capturing()
            try:
                return self._check(runner.run(feeds), shape[0])[:rows]
            except Exception as exc:  # noqa: BLE001 - a capture refused: rerun without graphs
                if not capturing:
                    raise
                warnings.warn(f"CUDA graph capture failed for shape {shape} ({exc}); running it without",
                              RuntimeWarning, stacklevel=2)
                self._fixed[shape] = runner = _BoundRunner(self._make_session(shape), self.manifest, shape)
                return self._check(runner.run(feeds), shape[0])[:rows]
        return self._check(runner.run([self.manifest.output], feeds)[0], shape[0])[:rows]

    def _check(self, out: np.ndarray, rows: int) -> np.ndarray:
        if out.dtype != np.float32 or out.shape != (rows, self.manifest.dim):
            raise RuntimeError(f"onnxruntime returned {out.dtype} {out.shape}, expected float32 "
                               f"({rows}, {self.manifest.dim})")
        return out


def load(manifest: Manifest, provider: str, threads: int | None) -> OrtGpuBackend:
    if manifest.precision == "int8":
        # Its integer products are onnxruntime CPU contrib kernels (MatMulIntegerToFloat): on a GPU provider
        # onnxruntime would quietly place them on the CPU, the "GPU" run would be mostly a CPU one, and
        # the int8 bits were never checked there.
        raise ValueError(f"int8 artifacts run on the CPU provider only, not {provider!r}; export an fp32 "
                         f"artifact for the GPU")
    wanted = ORT_PROVIDERS[provider]
    available = ort.get_available_providers()
    if wanted not in available:
        raise RuntimeError(missing_provider_message(provider, wanted, available))
    return OrtGpuBackend(manifest, provider, threads)
