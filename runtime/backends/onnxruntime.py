"""onnxruntime backend: one InferenceSession serves every shape (dynamic and all fixed buckets)."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from ..manifest import Manifest

ORT_PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider",
                 "tensorrt": "TensorrtExecutionProvider"}


class OrtBackend:
    def __init__(self, session: ort.InferenceSession, output: str, provider: str):
        self.session = session
        self.output = output
        self.name = f"onnxruntime-{provider}"

    def run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        return self.session.run([self.output], feeds)[0]


def session_options(threads: int | None) -> ort.SessionOptions:
    so = ort.SessionOptions()
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    return so


def load(manifest: Manifest, provider: str, threads: int | None) -> OrtBackend:
    wanted = ORT_PROVIDERS[provider]
    if wanted not in ort.get_available_providers():
        from .ort_gpu import missing_provider_message

        raise RuntimeError(missing_provider_message(provider, wanted, ort.get_available_providers()))
    if provider != "cpu":  # CUDA / TensorRT EPs: provider options, fixed shapes, CUDA graphs
        from .ort_gpu import OrtGpuBackend

        return OrtGpuBackend(manifest, provider, threads)  # type: ignore[return-value]
    so = session_options(threads)
    # No memory patterns on CPU: onnxruntime keeps one per distinct input shape (about 10 KB each here), so a
    # server that sees thousands of (rows, length) shapes grows for hours; without them its RSS is flat
    # (measured: README, Serving, soak). The arena stays; results are the same bits either way.
    so.enable_mem_pattern = False
    session = ort.InferenceSession(str(manifest.model_file), so, providers=[wanted])
    return OrtBackend(session, manifest.output, provider)
