"""onnxruntime CPU backend: one InferenceSession serves every shape (dynamic and all fixed buckets). It runs
the artifact's fused CPU graph (model.cpu.onnx) when there is one, model.onnx otherwise.

The GPU execution providers live in ort_gpu.py, which builds on `session_options` here (one way: this
module imports no other backend).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from ..manifest import Manifest

CPU_EP = "CPUExecutionProvider"


class OrtBackend:
    def __init__(self, session: ort.InferenceSession, output: str, provider: str, model_file: Path):
        self.session = session
        self.output = output
        self.name = f"onnxruntime-{provider}"
        self.model_file = model_file  # the graph the session runs

    def run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        return self.session.run([self.output], feeds)[0]


ARENA_MAX_LENGTH = 2048  # longer max_length: no CPU memory arena (see load)


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
    if provider != "cpu":
        raise ValueError(f"backends/onnxruntime.py serves provider 'cpu' only, not {provider!r} (see ort_gpu.py)")
    if CPU_EP not in ort.get_available_providers():  # onnxruntime-gpu builds still have it; be explicit
        raise RuntimeError(f"this onnxruntime has no {CPU_EP} (available: {', '.join(ort.get_available_providers())})")
    so = session_options(threads)
    # Long-context models: the CPU arena keeps every size it ever handed out, so one 8,192-token text left
    # 4.3 GB resident where the plain allocator peaked at 2.7 GB (tiny ModernBERT, 4 heads; README, Long
    # contexts). Allocation changes no computed bit. Short-context models keep the arena (measured no lower).
    so.enable_cpu_mem_arena = manifest.max_length <= ARENA_MAX_LENGTH
    # No memory patterns on CPU: onnxruntime keeps one per distinct input shape (about 10 KB each, measured
    # over 512 shapes), and a server meets up to max_batch x max_length shapes. In a 4,000-request soak both
    # settings levelled off, patterns on 13.5 MiB lower (README, Serving): we pay that fixed cost for no
    # growth with the number of shapes. Results are the same bits either way.
    so.enable_mem_pattern = False
    # The fused graph where the export wrote one (export/cpu_graph.py): same model, fewer nodes, its own bits.
    model = manifest.cpu_model_file or manifest.model_file
    session = ort.InferenceSession(str(model), so, providers=[CPU_EP])
    return OrtBackend(session, manifest.output, provider, model)
