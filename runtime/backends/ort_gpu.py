"""onnxruntime's CUDA and TensorRT execution providers (needs onnxruntime-gpu: the `gpu` extra).

NOT RUN ON A GPU YET: written against onnxruntime's documented provider options and IO binding; the
option builders and shape planning are tested on CPU, the sessions themselves have not run anywhere.

Shapes: a batch whose (rows, length) is one of the manifest's fixed buckets (fixed mode) runs at
(largest bucket batch for that length, length), filled with copies of its first row, so every text of
a length bucket runs at one shape whatever its companions. Other shapes (dynamic mode) run as they are.
  - CUDA EP: fixed shapes run in one session per length whose free dimensions are pinned to that shape
    (all shape arithmetic folds to constants) with CUDA graphs and IO binding (`enable_cuda_graph`);
    other shapes in a plain CUDA session. TF32 is off (`use_tf32=0`), deterministic compute on.
  - TensorRT EP: one session whose optimization profiles are one exact profile per fixed shape, then
    the dynamic profiles; engines and timing cache are cached under $STABLEEMBED_CACHE (default
    ~/.cache/stableembed)/ort-trt/<model sha256>. onnxruntime's TensorRT EP has no option to clear TF32.
A provider onnxruntime cannot start raises; nothing falls back to the CPU silently.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import onnxruntime as ort

from ..manifest import Manifest
from .tensorrt import Profile, default_profiles, pad_rows

ORT_PROVIDERS = {"cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}


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


def fixed_shape(rows: int, length: int, fixed_buckets: Sequence[tuple[int, int]]) -> tuple[int, int] | None:
    """The one shape fixed-mode batches of this length run at, or None for a non-bucket (dynamic) batch."""
    buckets = {(int(b), int(t)) for b, t in fixed_buckets}
    if (rows, length) not in buckets:
        return None
    return max(b for b, t in buckets if t == length), length


def cache_dir(manifest: Manifest) -> Path:
    root = Path(os.environ.get("STABLEEMBED_CACHE", "~/.cache/stableembed")).expanduser()
    return root / "ort-trt" / manifest.model_sha256[:16]  # the graph and its external weights


def cuda_options(cuda_graph: bool = False) -> dict[str, str]:
    opts = {"device_id": "0", "use_tf32": "0", "cudnn_conv_algo_search": "DEFAULT"}
    if cuda_graph:
        opts["enable_cuda_graph"] = "1"
    return opts


def shape_list(inputs: Sequence[str], shapes: Sequence[tuple[int, int]]) -> str:
    """onnxruntime's profile-shape syntax: 'input_ids:1x16,attention_mask:1x16,input_ids:32x128,...'."""
    return ",".join(f"{name}:{b}x{t}" for b, t in shapes for name in inputs)


def tensorrt_options(manifest: Manifest, profiles: Sequence[Profile] | None = None) -> dict[str, str]:
    fixed = sorted({fixed_shape(b, t, manifest.fixed_buckets) for b, t in manifest.fixed_buckets})  # type: ignore[type-var]
    profiles = list(profiles or default_profiles(manifest.max_length, manifest.fixed_buckets))
    all_profiles = [Profile(s, s, s) for s in fixed] + profiles  # exact profiles first
    cache = str(cache_dir(manifest))
    return {
        "device_id": "0",
        "trt_fp16_enable": "False",
        "trt_engine_cache_enable": "True",
        "trt_engine_cache_path": cache,
        "trt_timing_cache_enable": "True",
        "trt_timing_cache_path": cache,
        "trt_profile_min_shapes": shape_list(manifest.inputs, [p.min for p in all_profiles]),
        "trt_profile_opt_shapes": shape_list(manifest.inputs, [p.opt for p in all_profiles]),
        "trt_profile_max_shapes": shape_list(manifest.inputs, [p.max for p in all_profiles]),
    }


def _session(manifest: Manifest, providers: list, threads: int | None,
             pin: dict[str, int] | None = None) -> ort.InferenceSession:
    from .onnxruntime import session_options

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


class _CudaGraphRunner:
    """One fixed shape on the CUDA EP: inputs and output bound once on the GPU, the graph replayed."""

    def __init__(self, session: ort.InferenceSession, manifest: Manifest, shape: tuple[int, int]):
        self.session = session
        self.used = False
        self.inputs = {n: ort.OrtValue.ortvalue_from_shape_and_type(list(shape), np.int64, "cuda", 0)
                       for n in manifest.inputs}
        self.out = ort.OrtValue.ortvalue_from_shape_and_type([shape[0], manifest.dim], np.float32, "cuda", 0)
        self.binding = session.io_binding()
        for n, v in self.inputs.items():
            self.binding.bind_ortvalue_input(n, v)
        self.binding.bind_ortvalue_output(manifest.output, self.out)

    def run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        for n, v in self.inputs.items():
            v.update_inplace(np.ascontiguousarray(feeds[n], dtype=np.int64))
        self.session.run_with_iobinding(self.binding)
        self.used = True
        return self.out.numpy()


class OrtGpuBackend:
    def __init__(self, manifest: Manifest, provider: str, threads: int | None):
        self.name = f"onnxruntime-{provider}"
        self.manifest, self.provider, self.threads = manifest, provider, threads
        self._graphs: dict[tuple[int, int], _CudaGraphRunner | None] = {}
        if provider == "tensorrt":
            cache_dir(manifest).mkdir(parents=True, exist_ok=True)
            providers = [("TensorrtExecutionProvider", tensorrt_options(manifest)),
                         ("CUDAExecutionProvider", cuda_options())]
        else:
            providers = [("CUDAExecutionProvider", cuda_options())]
        self.session = _session(manifest, providers, threads)

    def _graph(self, shape: tuple[int, int]) -> _CudaGraphRunner | None:
        if shape not in self._graphs:
            try:
                dims = self.session.get_inputs()[0].shape  # e.g. ['batch', 'seq']
                pin = {d: v for d, v in zip(dims, shape) if isinstance(d, str)}
                session = _session(self.manifest, [("CUDAExecutionProvider", cuda_options(cuda_graph=True))],
                                   self.threads, pin=pin)
                self._graphs[shape] = _CudaGraphRunner(session, self.manifest, shape)
            except Exception as exc:  # noqa: BLE001 - still on the GPU, without graph replay
                warnings.warn(f"CUDA graphs unavailable for shape {shape} ({exc}); running it without them",
                              RuntimeWarning, stacklevel=2)
                self._graphs[shape] = None
        return self._graphs[shape]

    def run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        rows, length = feeds["input_ids"].shape
        shape = fixed_shape(rows, length, self.manifest.fixed_buckets)
        if shape is not None:
            feeds = pad_rows(feeds, shape[0])
            runner = self._graph(shape) if self.provider == "cuda" else None
            if runner is not None:
                try:
                    return runner.run(feeds)[:rows]
                except Exception as exc:  # noqa: BLE001 - a capture refused on first use: run without graphs
                    if runner.used:
                        raise
                    warnings.warn(f"CUDA graph capture failed for shape {shape} ({exc}); running it without",
                                  RuntimeWarning, stacklevel=2)
                    self._graphs[shape] = None
        return self.session.run([self.manifest.output], feeds)[0][:rows]
