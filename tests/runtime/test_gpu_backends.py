"""GPU backends. CPU side (runs in CI): the manifest's "tensorrt" section, refusal of engines built for
another TensorRT/GPU, routing of batches to static/dynamic engines, onnxruntime GPU provider options,
provider-selection errors, the CUDA binding's error handling, lean imports.

GPU side (`@pytest.mark.gpu`; each skips itself where its GPU, TensorRT, cuda-python or onnxruntime-gpu
is missing): the CUDA binding on a real device, engines built and run natively (fp32 parity with the CPU
and fixed-mode bit stability; fp16 parity), onnxruntime's CUDA and TensorRT EPs.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from stableembed import Encoder
from stableembed.export.artifact import write_manifest
from stableembed.runtime import load_manifest
from stableembed.runtime.backends import _cuda
from stableembed.runtime.backends import ort_gpu
from stableembed.runtime.backends.tensorrt import (
    EngineMismatchError,
    Profile,
    engine_mismatch,
    pad_rows,
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
                 f"stableembed build-trt {faked_engines} --rebuild", "STABLEEMBED_TRT_REBUILD=1"):
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


# ---------------------------------------------------------------- onnxruntime's GPU providers (options)

def test_onnxruntime_gpu_options(minilm_artifact, monkeypatch, tmp_path) -> None:
    m = load_manifest(minilm_artifact)
    assert ort_gpu.fixed_shape(1, 16, m.fixed_buckets) == (32, 16)
    assert ort_gpu.fixed_shape(5, 16, m.fixed_buckets) is None
    assert ort_gpu.cuda_options() == {"device_id": "0", "use_tf32": "0", "cudnn_conv_algo_search": "DEFAULT"}
    assert ort_gpu.cuda_options(cuda_graph=True)["enable_cuda_graph"] == "1"
    monkeypatch.setenv("STABLEEMBED_CACHE", str(tmp_path))
    opts = ort_gpu.tensorrt_options(m)
    assert opts["trt_engine_cache_enable"] == "True" and opts["trt_fp16_enable"] == "False"
    assert opts["trt_engine_cache_path"].startswith(str(tmp_path / "ort-trt"))
    mins = opts["trt_profile_min_shapes"].split(",")
    assert len(mins) == 3 * 6  # 3 inputs x (5 exact fixed-shape profiles + 1 dynamic)
    assert mins[:3] == ["input_ids:32x16", "attention_mask:32x16", "token_type_ids:32x16"]
    assert mins[-3:] == ["input_ids:1x1", "attention_mask:1x1", "token_type_ids:1x1"]
    assert opts["trt_profile_max_shapes"].split(",")[-1] == "token_type_ids:64x256"


def test_fixed_batches_run_at_one_shape_per_length(minilm_artifact, real_texts) -> None:
    """OrtGpuBackend's routing, exercised on the CPU session: a fixed-mode batch is padded to its length's
    largest bucket batch and sliced back; the rows must be bit-identical to the CPU backend's."""
    cpu = Encoder(minilm_artifact, mode="fixed")
    backend = ort_gpu.OrtGpuBackend.__new__(ort_gpu.OrtGpuBackend)
    backend.manifest, backend.provider, backend._graphs = cpu.manifest, "tensorrt", {}
    backend.session = cpu.backend.session
    texts = real_texts[:11]
    encs = cpu.tokenizer.encode(texts)
    for batch in cpu.plan([len(e.ids) for e in encs], 32):
        feeds = cpu.tokenizer.feeds(encs, batch)
        out = backend.run(feeds)
        assert out.shape == (batch.rows, cpu.dim)
        assert same_bits(out, cpu.backend.run(feeds)).all()


# ------------------------------------------------------------------------------ provider selection errors

def test_cuda_without_onnxruntime_gpu_names_what_to_install(minilm_artifact) -> None:
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    with pytest.raises(RuntimeError) as err:
        Encoder(minilm_artifact, provider="cuda")
    msg = str(err.value)
    assert "CUDAExecutionProvider" in msg and "pip install 'stableembed[gpu]'" in msg and "onnxruntime-gpu" in msg


def test_tensorrt_without_engines_or_ep_names_both_ways(minilm_artifact) -> None:
    import onnxruntime as ort

    if "TensorrtExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has TensorRT")
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

def _gpu_or_skip() -> _cuda.DeviceInfo:
    try:
        return _cuda.device_info()
    except (ImportError, RuntimeError) as exc:
        pytest.skip(f"no usable CUDA GPU with cuda-python here: {exc}")


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


@pytest.fixture(scope="module")
def trt_artifacts(minilm_artifact, tmp_path_factory) -> dict[str, Path]:
    if importlib.util.find_spec("tensorrt") is None:
        pytest.skip("tensorrt is not installed")
    _gpu_or_skip()
    from stableembed.export.tensorrt import build_engines

    out = {}
    for precision in ("fp32", "fp16"):
        dst = tmp_path_factory.mktemp("trt-built") / f"minilm-{precision}"
        shutil.copytree(minilm_artifact, dst)
        build_engines(dst, fp16=precision == "fp16")
        out[precision] = dst
    return out


def _parity(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    return float(cos.min()), float(np.abs(a - b).max())


@pytest.mark.gpu
def test_native_tensorrt_fp32_matches_cpu_and_fixed_mode_is_bit_stable(trt_artifacts, real_texts) -> None:
    art = trt_artifacts["fp32"]
    sec = load_manifest(art).raw["tensorrt"]
    assert sec["tf32"] is False and sec["strongly_typed"] is True
    ref = Encoder(art).encode(real_texts)
    enc = Encoder(art, provider="tensorrt", mode="fixed")
    assert enc.backend.name == "tensorrt"
    out = enc.encode(real_texts)
    cos, diff = _parity(out, ref)
    assert cos >= 0.99999 and diff <= 1e-4, (cos, diff)  # fp32 without TF32: CPU parity tolerance
    alone = np.stack([enc.encode(t) for t in real_texts[:24]])
    assert same_bits(alone, out[:24]).all()  # alone vs among 153 companions: the same bits
    dyn = Encoder(art, provider="tensorrt", mode="dynamic").encode(real_texts)
    cos, diff = _parity(dyn, ref)
    assert cos >= 0.99999 and diff <= 1e-4, (cos, diff)


@pytest.mark.gpu
def test_native_tensorrt_fp16_within_a_loose_tolerance(trt_artifacts, real_texts) -> None:
    art = trt_artifacts["fp16"]
    ref = Encoder(art).encode(real_texts)
    enc = Encoder(art, provider="tensorrt", mode="fixed")
    out = enc.encode(real_texts)
    cos, diff = _parity(out, ref)
    assert cos >= 0.999 and diff <= 5e-3, (cos, diff)
    assert same_bits(np.stack([enc.encode(t) for t in real_texts[:12]]), out[:12]).all()


@pytest.mark.gpu
def test_native_tensorrt_refuses_another_gpu(trt_artifacts, monkeypatch) -> None:
    _fake_gpu(monkeypatch, "Some Other GPU", "7.5")
    with pytest.raises(EngineMismatchError, match="--rebuild"):
        Encoder(trt_artifacts["fp32"], provider="tensorrt")


@pytest.mark.gpu
@pytest.mark.parametrize("provider,ep", [("cuda", "CUDAExecutionProvider"), ("tensorrt", "TensorrtExecutionProvider")])
def test_onnxruntime_gpu_provider_fixed_mode(minilm_artifact, real_texts, provider, ep, monkeypatch, tmp_path) -> None:
    import onnxruntime as ort

    if ep not in ort.get_available_providers():
        pytest.skip(f"this onnxruntime has no {ep}")
    monkeypatch.setenv("STABLEEMBED_CACHE", str(tmp_path))
    ref = Encoder(minilm_artifact).encode(real_texts)
    enc = Encoder(minilm_artifact, provider=provider, mode="fixed")
    out = enc.encode(real_texts)
    cos, diff = _parity(out, ref)
    assert cos >= 0.99999, (cos, diff)
    assert same_bits(np.stack([enc.encode(t) for t in real_texts[:12]]), out[:12]).all()
