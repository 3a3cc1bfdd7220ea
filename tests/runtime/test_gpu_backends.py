"""GPU backends. CPU side (runs in CI): the manifest's "tensorrt" section, refusal of engines built for
another TensorRT/GPU, routing of batches to static/dynamic engines, onnxruntime GPU provider options,
provider-selection errors, the CUDA binding's error handling, lean imports.

GPU side (`@pytest.mark.gpu`; each skips itself only where there is no NVIDIA GPU or the package it needs,
TensorRT, cuda-python or onnxruntime-gpu, is missing; a broken CUDA binding on a GPU machine fails): the
CUDA binding on a real device, engines built and run natively (fp32 parity with the CPU and fixed-mode
bit identity; fp16 parity), onnxruntime's CUDA and TensorRT EPs, all on a small shape plan (5 native
engine builds in all). UNTESTED ON A GPU: no GPU machine with TensorRT was available to run them.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
import threading
import types
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from stableembed import Encoder
from stableembed.export.artifact import write_manifest
from stableembed.runtime import load_manifest
from stableembed.runtime.backends import _cuda
from stableembed.runtime.backends import ort_gpu
from stableembed.runtime.backends._shapes import Profile, fixed_shape, pad_rows
from stableembed.runtime.backends.tensorrt import (
    EngineMismatchError,
    engine_mismatch,
    read_section,
    route,
)
from stableembed.runtime.manifest import ArtifactError
from stableembed.runtime.verify import same_bits

H100 = ("NVIDIA H100 80GB HBM3", "9.0")


def _section(**over) -> dict:
    sec = {
        "tensorrt_version": "10.12.0.36", "gpu": H100[0], "compute_capability": H100[1],
        "built": "2026-01-01T00:00:00+00:00", "precision": "fp32", "strongly_typed": True, "tf32": False,
        "distributive_independence": True, "static_batches": "largest", "timing_cache": "trt-timing.cache",
        "engines": [{"file": "trt-fp32-static-32x16.engine", "kind": "static", "shape": [32, 16]},
                    {"file": "trt-fp32-static-32x256.engine", "kind": "static", "shape": [32, 256]},
                    {"file": "trt-fp32-dynamic.engine", "kind": "dynamic",
                     "profiles": [{"min": [1, 1], "opt": [8, 64], "max": [16, 128]},
                                  {"min": [1, 1], "opt": [32, 128], "max": [64, 256]}]}],
    }
    sec.update(over)
    return sec


def _raw(sec: dict) -> dict:
    return {"tensorrt": sec, "files": {e["file"]: {} for e in sec["engines"]}}


@pytest.fixture(scope="module")
def faked_engines(minilm_artifact, tmp_path_factory) -> Path:
    """A copy of the real artifact whose manifest has a "tensorrt" section and (fake) engine files."""
    dst = tmp_path_factory.mktemp("trt") / "minilm-trt"
    shutil.copytree(minilm_artifact, dst)
    raw = json.loads((dst / "manifest.json").read_text(encoding="utf-8"))
    raw["tensorrt"] = _section()
    for e in raw["tensorrt"]["engines"]:
        (dst / e["file"]).write_bytes(b"not a real engine")
    (dst / "trt-timing.cache").write_bytes(b"")
    write_manifest(dst, raw)
    return dst


def _fake_tensorrt(monkeypatch, version: str = "10.12.0.36") -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__=version))


def _fake_gpu(monkeypatch, name: str = H100[0], cc: str = H100[1]) -> None:
    monkeypatch.setattr(_cuda, "device_info", lambda device=None: _cuda.DeviceInfo(0, name, cc, 80 << 30))


# --------------------------------------------------------------------------------- the manifest section

def test_section_is_read_and_checked() -> None:
    eng = read_section(_raw(_section()))
    assert eng.static == {(32, 16): "trt-fp32-static-32x16.engine", (32, 256): "trt-fp32-static-32x256.engine"}
    assert eng.dynamic == "trt-fp32-dynamic.engine" and eng.distributive_independence
    assert eng.profiles[1] == Profile((1, 1), (32, 128), (64, 256))
    assert read_section({"files": {}}) is None
    with pytest.raises(ArtifactError, match="not among its files"):
        read_section({"tensorrt": _section(), "files": {}})
    bad = _section(engines=[{"file": "x.engine", "kind": "static", "shape": [32]}])
    with pytest.raises(ArtifactError, match="batch, length"):
        read_section(_raw(bad))
    with pytest.raises(ArtifactError, match="bad field"):
        read_section(_raw({k: v for k, v in _section().items() if k != "gpu"}))


def test_mismatch_names_what_differs() -> None:
    eng = read_section(_raw(_section()))
    assert engine_mismatch(eng, "10.12.0.36", *H100) is None
    diff = engine_mismatch(eng, "10.13.0.1", "NVIDIA A10G", "8.6")
    assert "TensorRT 10.12.0.36 vs 10.13.0.1" in diff and "'NVIDIA A10G'" in diff and "9.0 vs 8.6" in diff


def test_engines_built_elsewhere_are_refused_with_a_clear_error(faked_engines, monkeypatch) -> None:
    _fake_tensorrt(monkeypatch, "10.13.0.1")
    _fake_gpu(monkeypatch, "NVIDIA L4", "8.9")
    with pytest.raises(EngineMismatchError) as err:
        Encoder(faked_engines, provider="tensorrt")
    msg = str(err.value)
    for part in ("TensorRT 10.12.0.36", H100[0], "compute capability 9.0",  # what the engines were built for
                 "TensorRT 10.13.0.1", "NVIDIA L4", "compute capability 8.9",  # what this machine has
                 f"stableembed build-trt {faked_engines} --rebuild", f"stableembed build-trt {faked_engines} --if-stale"):
        assert part in msg, part
    _fake_tensorrt(monkeypatch, "10.12.0.36")  # same TensorRT, another GPU of the same architecture
    _fake_gpu(monkeypatch, "NVIDIA H100 PCIe", "9.0")
    with pytest.raises(EngineMismatchError, match="GPU 'NVIDIA H100 80GB HBM3' vs 'NVIDIA H100 PCIe' here"):
        Encoder(faked_engines, provider="tensorrt")


def test_engines_need_the_tensorrt_extra(faked_engines, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # not installed
    with pytest.raises(ImportError, match=re.escape("pip install 'stableembed[tensorrt]'")):
        Encoder(faked_engines, provider="tensorrt")
    _fake_tensorrt(monkeypatch, "8.6.1")
    with pytest.raises(ImportError, match="TensorRT >= 10"):
        Encoder(faked_engines, provider="tensorrt")
    _fake_tensorrt(monkeypatch)  # TensorRT, but no cuda-python
    for mod in ("cuda", "cuda.bindings", "cuda.bindings.runtime", "cuda.cudart"):
        monkeypatch.setitem(sys.modules, mod, None)
    with pytest.raises(ImportError, match=r"cuda-python.*stableembed\[tensorrt\]"):
        Encoder(faked_engines, provider="tensorrt")


def test_a_damaged_engine_file_is_caught_by_its_hash(faked_engines, tmp_path) -> None:
    dst = tmp_path / "copy"
    shutil.copytree(faked_engines, dst)
    (dst / "trt-fp32-dynamic.engine").write_bytes(b"not a real engine!")
    with pytest.raises(ArtifactError, match="trt-fp32-dynamic.engine"):
        load_manifest(dst)


# ------------------------------------------------- the native backend's checks, against a fake TensorRT

class _FakeEngine:
    """What TrtBackend reads of an ICudaEngine: named IO tensors, their modes and dtypes, profiles."""

    def __init__(self, out_dtype: str = "FLOAT", accept_profile: bool = True, profiles: int = 2):
        self.names = ["input_ids", "attention_mask", "token_type_ids", "sentence_embedding"]
        self.out_dtype, self.accept_profile, self.num_optimization_profiles = out_dtype, accept_profile, profiles
        self.num_io_tensors = len(self.names)
        self.profiles_set: list[int] = []

    def get_tensor_name(self, i):
        return self.names[i]

    def get_tensor_mode(self, name):
        return "OUTPUT" if name == "sentence_embedding" else "INPUT"

    def get_tensor_dtype(self, name):
        return self.out_dtype if name == "sentence_embedding" else "INT64"

    def create_execution_context(self):
        engine = self

        class Ctx:
            def set_optimization_profile_async(self, index, stream):
                engine.profiles_set.append(index)
                return engine.accept_profile  # TensorRT returns False when it cannot select the profile

        return Ctx()


def _fake_trt_runtime(monkeypatch, engine: _FakeEngine) -> None:
    class Logger:
        WARNING = 2

        def __init__(self, level):
            pass

    trt = types.SimpleNamespace(
        __version__="10.12.0.36", Logger=Logger,
        Runtime=lambda logger: types.SimpleNamespace(deserialize_cuda_engine=lambda data: engine),
        TensorIOMode=types.SimpleNamespace(INPUT="INPUT", OUTPUT="OUTPUT"),
        DataType=types.SimpleNamespace(INT64="INT64", FLOAT="FLOAT", HALF="HALF"))
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    _fake_gpu(monkeypatch)

    class Stream:
        handle = 1

        def synchronize(self):
            pass

    monkeypatch.setattr(_cuda, "Stream", Stream)
    monkeypatch.setattr(_cuda, "DeviceBuffer", lambda nbytes: types.SimpleNamespace(nbytes=nbytes, ptr=1))


def test_native_backend_checks_what_tensorrt_returns(faked_engines, monkeypatch) -> None:
    """The native backend on a fake TensorRT (no GPU): loads when every check passes; refuses a profile
    TensorRT would not select and an engine whose output is not float32."""
    engine = _FakeEngine()
    _fake_trt_runtime(monkeypatch, engine)
    enc = Encoder(faked_engines, provider="tensorrt", mode="fixed")
    assert enc.backend.name == "tensorrt" and engine.profiles_set == [0, 1]
    _fake_trt_runtime(monkeypatch, _FakeEngine(accept_profile=False))
    with pytest.raises(RuntimeError, match="refused optimization profile 0 of trt-fp32-dynamic.engine"):
        Encoder(faked_engines, provider="tensorrt")
    _fake_trt_runtime(monkeypatch, _FakeEngine(out_dtype="HALF"))
    with pytest.raises(ArtifactError, match="'sentence_embedding' is HALF, expected float32"):
        Encoder(faked_engines, provider="tensorrt")


def test_build_trt_if_stale_keeps_matching_engines_and_rebuilds_others(faked_engines, monkeypatch, tmp_path) -> None:
    """`build-trt --if-stale`, the export side's replacement for rebuilding on load: engines built with
    this TensorRT on this GPU are kept untouched; others go to a rebuild (here it stops where building starts)."""
    from stableembed.export.tensorrt import build_engines

    dst = tmp_path / "copy"
    shutil.copytree(faked_engines, dst)
    before = (dst / "manifest.json").read_bytes()

    class BuildStarted(Exception):
        pass

    class Logger:
        WARNING = 2

        def __init__(self, level):
            raise BuildStarted

    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="10.12.0.36", Logger=Logger))
    _fake_gpu(monkeypatch)
    logs: list[str] = []
    m = build_engines(dst, if_stale=True, log=logs.append)
    assert m.raw["tensorrt"]["gpu"] == H100[0] and (dst / "manifest.json").read_bytes() == before
    assert "kept" in logs[-1]
    _fake_gpu(monkeypatch, "NVIDIA L4", "8.9")
    with pytest.raises(BuildStarted):
        build_engines(dst, if_stale=True, log=logs.append)
    assert "rebuilding engines (GPU 'NVIDIA H100 80GB HBM3' vs 'NVIDIA L4' here" in logs[-1]
    _fake_gpu(monkeypatch)
    with pytest.raises(BuildStarted):  # same machine, other precision: rebuilt too
        build_engines(dst, if_stale=True, fp16=True, log=logs.append)
    assert "precision fp32 -> fp16" in logs[-1]


# ---------------------------------------------------------------------------------------------- routing

def test_routing_static_for_fixed_buckets_dynamic_for_the_rest() -> None:
    eng = read_section(_raw(_section()))
    buckets = [(1, 16), (8, 16), (32, 16), (1, 256), (8, 256), (32, 256), (1, 64), (8, 64)]
    assert route(1, 16, eng, buckets) == ("static", (32, 16))
    assert route(8, 256, eng, buckets) == ("static", (32, 256))
    assert route(1, 64, eng, buckets) == ("dynamic", 0)  # a bucket length without a static engine
    assert route(5, 16, eng, buckets) == ("dynamic", 0)  # not a bucket: dynamic mode
    assert route(40, 200, eng, buckets) == ("dynamic", 1)
    with pytest.raises(ValueError, match="fits no TensorRT engine.*batch_size"):
        route(100, 16, eng, buckets)


def test_pad_rows_repeats_the_first_row() -> None:
    feeds = {"input_ids": np.array([[1, 2, 0], [3, 4, 5]]), "attention_mask": np.array([[1, 1, 0], [1, 1, 1]])}
    out = pad_rows(feeds, 4)
    assert out["input_ids"].tolist() == [[1, 2, 0], [3, 4, 5], [1, 2, 0], [1, 2, 0]]
    assert out["attention_mask"].shape == (4, 3)
    assert pad_rows(feeds, 2) is feeds
    with pytest.raises(ValueError, match="2 rows does not fit a shape of 1 rows"):
        pad_rows(feeds, 1)


# ---------------------------------------------------------------- onnxruntime's GPU providers (options)

def test_onnxruntime_gpu_options(minilm_artifact, monkeypatch, tmp_path) -> None:
    m = load_manifest(minilm_artifact)
    assert fixed_shape(1, 16, m.fixed_buckets) == (32, 16)
    assert fixed_shape(5, 16, m.fixed_buckets) is None
    assert ort_gpu.cuda_options() == {"device_id": "0", "use_tf32": "0", "cudnn_conv_algo_search": "DEFAULT"}
    assert ort_gpu.cuda_options(cuda_graph=True)["enable_cuda_graph"] == "1"
    monkeypatch.setenv("STABLEEMBED_CACHE", str(tmp_path))
    # one session, one profile: a run shape gets an exact profile and an engine cache folder of its own
    fixed = ort_gpu.tensorrt_options(m, Profile.exact((32, 16)), ort_gpu.session_tag((32, 16)))
    exact = "input_ids:32x16,attention_mask:32x16,token_type_ids:32x16"
    assert fixed["trt_profile_min_shapes"] == fixed["trt_profile_opt_shapes"] == fixed["trt_profile_max_shapes"] == exact
    assert fixed["trt_engine_cache_enable"] == "True" and fixed["trt_fp16_enable"] == "False"
    dyn = ort_gpu.tensorrt_options(m, Profile((1, 1), (32, 128), (64, 256)), ort_gpu.session_tag(None))
    assert dyn["trt_profile_min_shapes"] == "input_ids:1x1,attention_mask:1x1,token_type_ids:1x1"
    assert dyn["trt_profile_max_shapes"] == "input_ids:64x256,attention_mask:64x256,token_type_ids:64x256"
    root = ort_gpu.cache_dir(m)
    assert str(root).startswith(str(tmp_path / "ort-trt"))
    assert fixed["trt_engine_cache_path"] == str(root / "fixed-32x16") and dyn["trt_engine_cache_path"] == str(root / "dynamic")
    assert fixed["trt_timing_cache_path"] == dyn["trt_timing_cache_path"] == str(root)  # timings are shared


class _CpuBoundRunner:
    """Stands in for the CUDA EP's IO-bound runner on CPU: runs the (pinned) session it was given."""

    def __init__(self, session, manifest, shape, graph=False):
        self.session, self.output, self.shape = session, manifest.output, shape

    def capturing(self):
        return False

    def run(self, feeds):
        assert feeds["input_ids"].shape == self.shape  # filled up to the run shape before binding
        return self.session.run([self.output], feeds)[0]


class _FakeOrtValue:
    """A host array standing in for a CUDA OrtValue (no GPU here)."""

    def __init__(self, shape, dtype):
        self.array = np.zeros(shape, dtype)

    @classmethod
    def ortvalue_from_shape_and_type(cls, shape, dtype, device, device_id):
        assert device == "cuda"
        return cls(shape, dtype)

    def update_inplace(self, array):
        self.array[...] = array

    def numpy(self):
        return self.array.copy()


class _CaptureSession:
    """Stands in for a CUDA EP session with IO binding: counts each thread's runs, and with `refuse` fails
    the run on which onnxruntime captures (the 2nd or the 3rd, by version), as a refused capture does."""

    def __init__(self, dim, refuse_on=None):
        self.dim, self.refuse_on, self.runs = dim, refuse_on, {}
        self.inputs, self.output = {}, None

    def get_inputs(self):
        return [types.SimpleNamespace(shape=["batch", "sequence"])]

    def io_binding(self):
        session = self

        class Binding:
            def bind_ortvalue_input(self, name, value):
                session.inputs[name] = value

            def bind_ortvalue_output(self, name, value):
                session.output = value
        return Binding()

    def run_with_iobinding(self, binding):
        thread = threading.get_ident()
        self.runs[thread] = self.runs.get(thread, 0) + 1
        if self.runs[thread] == self.refuse_on:
            raise RuntimeError("operation not permitted when stream is capturing")
        ids = self.inputs["input_ids"].array
        self.output.array[...] = ids.sum(axis=1, keepdims=True).astype(np.float32)  # a row's own result


@pytest.mark.parametrize("refuse_on", [2, 3, None])
def test_a_refused_cuda_graph_capture_falls_back_in_the_call_that_captures(minilm_artifact, monkeypatch,
                                                                           refuse_on) -> None:
    """onnxruntime captures on a thread's 2nd or 3rd run, not its first: the first call of a thread on a
    graph runner runs until the capture is done, so a refused capture fails inside that call, which falls
    back to a session without graphs (a warning), instead of failing a later batch. A new thread (the
    graph is per thread) captures again in its own first call."""
    m = load_manifest(minilm_artifact)
    made = []

    def fake_session(manifest, providers, threads, pin=None):
        graph = providers[0][1].get("enable_cuda_graph") == "1"
        made.append(_CaptureSession(manifest.dim, refuse_on if graph else None))
        return made[-1]

    monkeypatch.setattr(ort_gpu, "_session", fake_session)
    monkeypatch.setattr(ort_gpu.ort, "OrtValue", _FakeOrtValue)
    backend = ort_gpu.OrtGpuBackend(m, "cuda", threads=None)
    shape = fixed_shape(1, 16, m.fixed_buckets)
    feeds = {n: np.full((1, 16), 7, np.int64) for n in m.inputs}
    expected = np.full((shape[0], 1), 7 * 16, np.float32)

    def call():
        out = backend.run(feeds)
        assert out.shape == (1, m.dim) and (out == expected[:1]).all()

    if refuse_on is None:
        call()
        graph_session = made[-1]
        assert list(graph_session.runs.values()) == [ort_gpu.CAPTURE_RUNS]  # captured within the first call
        call()
        assert list(graph_session.runs.values()) == [ort_gpu.CAPTURE_RUNS + 1]  # then one run a call
        with ThreadPoolExecutor(1) as pool:
            pool.submit(call).result()  # another thread: its own capture, in its own first call
        assert sorted(graph_session.runs.values()) == [ort_gpu.CAPTURE_RUNS, ort_gpu.CAPTURE_RUNS + 1]
        return
    with pytest.warns(RuntimeWarning, match="CUDA graph capture failed"):
        call()
    assert backend._fixed[shape].graph is False and not backend._fixed[shape].capturing()
    call()  # the fallback session serves the next batches


@pytest.mark.parametrize("provider", ["cuda", "tensorrt"])
def test_gpu_session_layout_and_routing_on_cpu_sessions(minilm_artifact, real_texts, monkeypatch, tmp_path,
                                                         provider) -> None:
    """OrtGpuBackend with its sessions made on onnxruntime's CPU EP (same options, pins and profiles as on
    the GPU): one session per run shape made on first use, each TensorRT EP session with exactly one
    profile, exact for a run shape; every row bit-identical to a plain session's, at first, middle and last
    row of batches of several sizes and paddings, in fixed and dynamic mode. The stand-in sessions run the
    graph op for op (no onnxruntime optimizations: with them, a pinned shape enables other fusions and
    changes low bits, which is onnxruntime's doing, not the routing's)."""
    import onnxruntime as ort

    made = []

    def cpu_session(manifest, providers, threads, pin=None, record=True):
        if record:
            made.append((providers, dict(pin or {})))
        so = ort.SessionOptions()
        so.log_severity_level = 3
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        for dim, value in (pin or {}).items():
            so.add_free_dimension_override_by_name(dim, value)
        return ort.InferenceSession(str(manifest.model_file), so, providers=["CPUExecutionProvider"])

    monkeypatch.setattr(ort_gpu, "_session", cpu_session)
    monkeypatch.setattr(ort_gpu, "_BoundRunner", _CpuBoundRunner)
    monkeypatch.setenv("STABLEEMBED_CACHE", str(tmp_path))
    monkeypatch.delenv("NVIDIA_TF32_OVERRIDE", raising=False)
    cpu = Encoder(minilm_artifact, mode="fixed")
    plain = cpu_session(cpu.manifest, None, None, record=False)
    backend = ort_gpu.OrtGpuBackend(cpu.manifest, provider, threads=None)
    assert len(made) == 1  # the dynamic session only; run-shape sessions come on first use
    encs = cpu.tokenizer.encode(real_texts[:40])
    # texts up to 30 tokens keep the run shapes small (32x16..32x64): op-for-op CPU sessions are slow
    by_len = sorted((i for i in range(len(encs)) if len(encs[i].ids) <= 30), key=lambda i: len(encs[i].ids))
    from stableembed.runtime.schedule import Batch

    shapes_seen = set()
    for rows in (1, 3, 8):  # fixed buckets (1 and 8 rows) and a dynamic batch (3 rows)
        for start in (0, len(by_len) - rows):  # shortest and longest texts: different paddings
            idx = tuple(by_len[start:start + rows])
            for length in sorted({max(len(encs[i].ids) for i in idx), 64}):
                if length < max(len(encs[i].ids) for i in idx):
                    continue
                feeds = cpu.tokenizer.feeds(encs, Batch(idx, length, rows))
                out = backend.run(feeds)
                ref = plain.run([cpu.manifest.output], feeds)[0]
                assert out.shape == (rows, cpu.dim) and same_bits(out, ref).all(), (rows, length)
                assert same_bits(out[[0, rows // 2, rows - 1]], ref[[0, rows // 2, rows - 1]]).all()
                shapes_seen.add(fixed_shape(rows, length, cpu.manifest.fixed_buckets))
    run_shapes = sorted(s for s in shapes_seen if s is not None)
    assert run_shapes and set(backend._fixed) == set(run_shapes)
    assert len(made) == 1 + len(run_shapes)  # one session per run shape used, and one dynamic session
    assert backend.tf32_possible == (provider == "tensorrt")  # NVIDIA_TF32_OVERRIDE is not set in the tests
    if provider == "tensorrt":
        n_inputs = len(cpu.manifest.inputs)
        for providers, pin in made:
            (ep, opts), (fallback, _) = providers
            assert ep == "TensorrtExecutionProvider" and fallback == "CUDAExecutionProvider" and not pin
            for key in ("trt_profile_min_shapes", "trt_profile_opt_shapes", "trt_profile_max_shapes"):
                assert len(opts[key].split(",")) == n_inputs, opts[key]  # exactly one profile per session
        exact = [providers[0][1] for providers, _ in made[1:]]
        assert all(o["trt_profile_min_shapes"] == o["trt_profile_max_shapes"] for o in exact)
        assert {o["trt_engine_cache_path"] for o in exact} == {str(ort_gpu.cache_dir(cpu.manifest) / f"fixed-{b}x{t}")
                                                               for b, t in run_shapes}
        short = by_len[0]
        too_many = Batch((short,) * 80, len(encs[short].ids), 80)  # not a bucket, beyond the 64-row profile
        with pytest.raises(ValueError, match="outside the TensorRT EP's dynamic profile"):
            backend.run(cpu.tokenizer.feeds(encs, too_many))
    else:
        for providers, pin in made[1:]:  # run-shape sessions: CUDA graphs on, free dimensions pinned
            assert providers[0][1]["enable_cuda_graph"] == "1" and providers[0][1]["use_tf32"] == "0"
            assert sorted(pin.values()) in [sorted(s) for s in run_shapes]
        assert "enable_cuda_graph" not in made[0][0][0][1] and made[0][1] == {}


# ------------------------------------------------------------------------------ provider selection errors

def test_cuda_without_onnxruntime_gpu_names_what_to_install(minilm_artifact, monkeypatch) -> None:
    import onnxruntime as ort

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])  # simulated
    with pytest.raises(RuntimeError) as err:
        Encoder(minilm_artifact, provider="cuda")
    msg = str(err.value)
    assert "CUDAExecutionProvider" in msg and "pip install 'stableembed[gpu]'" in msg and "onnxruntime-gpu" in msg


@pytest.mark.parametrize("provider", ["cuda", "tensorrt"])
def test_an_int8_artifact_is_refused_on_gpu_providers(provider) -> None:
    """Refused before any session: onnxruntime would place its CPU-only integer kernels on the CPU."""
    from types import SimpleNamespace

    from stableembed.runtime.backends import ort_gpu

    with pytest.raises(ValueError, match=f"int8 artifacts run on the CPU provider only, not '{provider}'"):
        ort_gpu.load(SimpleNamespace(precision="int8"), provider, None)


def test_tensorrt_without_engines_or_ep_names_both_ways(minilm_artifact, monkeypatch) -> None:
    import onnxruntime as ort

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])  # simulated
    with pytest.raises(RuntimeError) as err:
        Encoder(minilm_artifact, provider="tensorrt")
    msg = str(err.value)
    for part in ("stableembed build-trt", "stableembed[tensorrt]", "TensorrtExecutionProvider", "stableembed[gpu]"):
        assert part in msg, part


# ----------------------------------------------------------------------------------------- CUDA binding

def test_cuda_errors_name_the_call_and_cudas_error() -> None:
    err_t = types.SimpleNamespace(cudaSuccess=0)
    rt = types.SimpleNamespace(cudaError_t=err_t, cudaGetErrorName=lambda e: (0, b"cudaErrorMemoryAllocation"),
                               cudaGetErrorString=lambda e: (0, b"out of memory"))
    assert _cuda.check(rt, "cudaMalloc", (0, 1234)) == 1234
    assert _cuda.check(rt, "cudaStreamSynchronize", (0,)) is None
    with pytest.raises(_cuda.CudaError, match=r"cudaMalloc failed: cudaErrorMemoryAllocation \(out of memory\)"):
        _cuda.check(rt, "cudaMalloc", (2, None))


def test_device_info_without_a_gpu_is_a_clear_error() -> None:
    try:
        _cuda.cudart()
    except ImportError as exc:
        assert "stableembed[tensorrt]" in str(exc)
        return
    try:
        info = _cuda.device_info()
    except _cuda.CudaError as exc:
        assert "cudaGetDeviceCount" in str(exc) or "no CUDA GPU" in str(exc)
    else:
        pytest.skip(f"a GPU is present here ({info.name})")


def test_gpu_modules_import_nothing_heavy() -> None:
    code = ("import sys; import stableembed.runtime.backends.tensorrt, stableembed.runtime.backends.ort_gpu, "
            "stableembed.runtime.backends._cuda, stableembed.export.tensorrt, stableembed.export.fp16; "
            "bad = [m for m in ('tensorrt', 'cuda', 'onnx', 'torch') if m in sys.modules]; print(bad); "
            "sys.exit(1 if bad else 0)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


# ============================================================================================ GPU only

def _nvidia_gpu_present() -> bool:
    """Whether this machine has an NVIDIA GPU at all (device nodes or nvidia-smi listing one), asked
    without any CUDA binding, so that a broken binding on a GPU machine cannot pass for "no GPU"."""
    if any(Path("/dev").glob("nvidia[0-9]*")):
        return True
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return False
    try:
        res = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return False
    return res.returncode == 0 and "GPU" in res.stdout


def _require_gpu() -> None:
    if not _nvidia_gpu_present():
        pytest.skip("no NVIDIA GPU on this machine")


def _gpu_or_skip() -> _cuda.DeviceInfo:
    """Skip only where there is no GPU or no cuda-python; on a GPU machine any CUDA failure fails the test."""
    _require_gpu()
    try:
        _cuda.cudart()
    except ImportError as exc:
        pytest.skip(f"cuda-python is not installed: {exc}")
    return _cuda.device_info()  # a GPU is present: a CudaError here is a broken setup, and fails


def test_gpu_skip_is_only_for_a_missing_gpu(monkeypatch) -> None:
    """A GPU machine whose CUDA binding is broken must fail the GPU tests, not skip them."""
    monkeypatch.setattr(sys.modules[__name__], "_nvidia_gpu_present", lambda: True)
    monkeypatch.setattr(_cuda, "cudart", lambda: types.SimpleNamespace())  # importable, present
    def broken(device=None):
        raise _cuda.CudaError("CUDA call cudaGetDeviceCount failed: cudaErrorInsufficientDriver")
    monkeypatch.setattr(_cuda, "device_info", broken)
    with pytest.raises(_cuda.CudaError, match="cudaErrorInsufficientDriver"):
        _gpu_or_skip()
    monkeypatch.setattr(sys.modules[__name__], "_nvidia_gpu_present", lambda: False)
    with pytest.raises(pytest.skip.Exception, match="no NVIDIA GPU"):
        _gpu_or_skip()


@pytest.mark.gpu
def test_cuda_binding_on_a_device() -> None:
    dev = _gpu_or_skip()
    assert dev.name and re.fullmatch(r"\d+\.\d+", dev.compute_capability) and dev.total_memory > 0
    stream = _cuda.Stream()
    a = np.arange(4096, dtype=np.int64) * 7 - 3
    buf = _cuda.DeviceBuffer(a.nbytes)
    stream.to_device(buf, a)
    b = np.empty_like(a)
    stream.to_host(b, buf)
    stream.synchronize()
    assert (a == b).all()
    with pytest.raises(ValueError, match="do not fit"):
        stream.to_device(buf, np.zeros(4097, dtype=np.int64))
    buf.free()
    stream.destroy()


SMALL_BUCKETS = [[1, 32], [8, 32], [1, 64], [8, 64]]


@pytest.fixture(scope="module")
def small_gpu_artifact(minilm_artifact, tmp_path_factory) -> Path:
    """The real artifact with a small shape plan (max_length 64; buckets 1x32, 8x32, 1x64, 8x64): two run
    shapes, so the GPU tests build 2 static engines + 1 dynamic per precision, not 12, and fit one call."""
    dst = tmp_path_factory.mktemp("gpu-small") / "minilm-64"
    shutil.copytree(minilm_artifact, dst)
    raw = json.loads((dst / "manifest.json").read_text(encoding="utf-8"))
    raw["max_length"] = 64
    raw["shapes"]["fixed_buckets"] = SMALL_BUCKETS
    raw["shapes"]["dynamic"]["length"] = "2..64"
    write_manifest(dst, raw)
    return dst


@pytest.fixture(scope="module")
def trt_artifacts(small_gpu_artifact, tmp_path_factory) -> dict[str, Path]:
    """fp32: 2 static + 1 dynamic engine; fp16: 2 static engines (fixed mode only). 5 builds in all.
    UNTESTED: TensorRT could not be installed anywhere this project has run."""
    _gpu_or_skip()
    if importlib.util.find_spec("tensorrt") is None:
        pytest.skip("tensorrt is not installed")
    from stableembed.export.tensorrt import build_engines

    out = {}
    for precision in ("fp32", "fp16"):
        dst = tmp_path_factory.mktemp("trt-built") / f"minilm-{precision}"
        shutil.copytree(small_gpu_artifact, dst)
        build_engines(dst, fp16=precision == "fp16", profiles="1x1:8x64:16x64", dynamic=precision == "fp32")
        out[precision] = dst
    return out


def _parity(a: np.ndarray, b: np.ndarray) -> dict:
    from stableembed.export.parity import parity_figures

    return parity_figures(a, b)


def _alone_and_shuffled(enc: Encoder, texts: list[str], n: int = 12) -> None:
    """Fixed mode: each of the first n texts alone and inside shuffled batches gives the same bits."""
    out = enc.encode(texts)
    alone = np.stack([enc.encode(t) for t in texts[:n]])
    assert same_bits(alone, out[:n]).all()
    order = np.random.default_rng(7).permutation(len(texts))
    shuffled = enc.encode([texts[i] for i in order])
    assert same_bits(shuffled[np.argsort(order)], out).all()


@pytest.mark.gpu
def test_native_tensorrt_fp32_matches_cpu_and_fixed_mode_is_bit_stable(trt_artifacts, real_texts) -> None:
    art = trt_artifacts["fp32"]
    sec = load_manifest(art).raw["tensorrt"]
    assert sec["tf32"] is False and sec["strongly_typed"] is True
    assert len(sec["engines"]) == 3
    ref = Encoder(art).encode(real_texts)
    enc = Encoder(art, provider="tensorrt", mode="fixed")
    assert enc.backend.name == "tensorrt"
    out = enc.encode(real_texts)
    from stableembed.export.parity import PARITY_TOLERANCE

    figures = _parity(out, ref)
    assert PARITY_TOLERANCE.accepts(figures), figures  # fp32 without TF32: the project's parity tolerance
    _alone_and_shuffled(enc, real_texts)
    dyn = Encoder(art, provider="tensorrt", mode="dynamic").encode(real_texts, batch_size=16)
    figures = _parity(dyn, ref)
    assert PARITY_TOLERANCE.accepts(figures), figures


@pytest.mark.gpu
def test_native_tensorrt_fp16_within_a_loose_tolerance(trt_artifacts, real_texts) -> None:
    art = trt_artifacts["fp16"]
    ref = Encoder(art).encode(real_texts)
    enc = Encoder(art, provider="tensorrt", mode="fixed")
    out = enc.encode(real_texts)
    figures = _parity(out, ref)
    assert figures["min_cosine"] >= 0.999 and figures["max_abs_diff"] <= 5e-3, figures  # fp16: loose by design
    _alone_and_shuffled(enc, real_texts)


@pytest.mark.gpu
def test_native_tensorrt_refuses_another_gpu(trt_artifacts, monkeypatch) -> None:
    _fake_gpu(monkeypatch, "Some Other GPU", "7.5")
    with pytest.raises(EngineMismatchError, match="--rebuild"):
        Encoder(trt_artifacts["fp32"], provider="tensorrt")


@pytest.mark.gpu
@pytest.mark.parametrize("provider,ep", [("cuda", "CUDAExecutionProvider"), ("tensorrt", "TensorrtExecutionProvider")])
def test_onnxruntime_gpu_provider_fixed_mode(small_gpu_artifact, real_texts, provider, ep, monkeypatch,
                                             tmp_path) -> None:
    """CUDA EP: fp32 with TF32 off, held to the parity tolerance. TensorRT EP (UNTESTED: no TensorRT
    anywhere here): TF32 may be on (only NVIDIA_TF32_OVERRIDE=0 before the first CUDA context clears it),
    so it is held to TRT_EP_TOLERANCE; fixed-mode bit identity is claimed for both."""
    import onnxruntime as ort

    _require_gpu()
    if ep not in ort.get_available_providers():
        pytest.skip(f"this onnxruntime has no {ep} (onnxruntime-gpu is not installed)")
    monkeypatch.setenv("STABLEEMBED_CACHE", str(tmp_path))
    ref = Encoder(small_gpu_artifact).encode(real_texts)
    enc = Encoder(small_gpu_artifact, provider=provider, mode="fixed")
    out = enc.encode(real_texts)
    from stableembed.export.parity import PARITY_TOLERANCE, ParityTolerance

    figures = _parity(out, ref)
    tolerance = PARITY_TOLERANCE if provider == "cuda" else ParityTolerance(*ort_gpu.TRT_EP_TOLERANCE)
    assert tolerance.accepts(figures), figures
    _alone_and_shuffled(enc, real_texts)
    assert len(enc.backend._fixed) == 2  # one session per run shape (32 and 64 tokens, 8 rows each)
