"""Deployment backends: selection by suffix, the (moving, fixed) -> disp contract, errors, fallbacks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest_export import PARITY_TOL, SHAPE, exported, random_pair, scratch_dir, tiny_model, torch_disp

from eoir_cli.backends import BackendError, OnnxBackend, TorchBackend, backend_kind, load_backend
from eoir_cli.checkpoint import save_checkpoint
from eoir_cli.errors import GpuUnavailableError


@pytest.mark.parametrize(("name", "kind"), [
    ("m.pt", "torch"), ("m.pth", "torch"), ("EOIR_oasis.pth.tar", "torch"), ("m.safetensors", "torch"),
    ("m.onnx", "onnx"),
    ("m.engine", "tensorrt"), ("m.plan", "tensorrt"), ("lumir", "torch"), ("default", "torch"), ("M.ONNX", "onnx"),
])
def test_backend_kind_by_suffix(name, kind):
    assert backend_kind(name) == kind


@pytest.mark.parametrize("name", ["brain.nii.gz", "model.h5", "weights"])
def test_unknown_suffix_lists_the_supported_ones(name):
    with pytest.raises(BackendError,
                       match=r"expected one of \.pt, \.pth, \.pth\.tar, \.safetensors, \.onnx, \.engine, \.plan"):
        load_backend(name)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_checkpoints_open_with_torch_backend_and_match_the_model(suffix):
    path = save_checkpoint(scratch_dir() / f"tiny{suffix}", tiny_model())
    backend = load_backend(path, device="cpu")
    assert isinstance(backend, TorchBackend) and backend.name == "torch"
    assert backend.config == tiny_model().config and backend.input_shape is None
    moving, fixed = random_pair()
    disp = backend(moving, fixed)
    assert disp.shape == (3, *SHAPE) and disp.dtype == np.float32
    assert np.abs(disp - torch_disp(tiny_model(), moving, fixed)).max() <= 1e-5


def test_onnx_backend_matches_torch_backend():
    path = save_checkpoint(scratch_dir() / "tiny.pt", tiny_model())
    onnx_backend = load_backend(exported("gather").path, device="cpu")
    assert isinstance(onnx_backend, OnnxBackend)
    assert onnx_backend.providers == ["CPUExecutionProvider"] and onnx_backend.fallback_reason is None
    moving, fixed = random_pair(seed=11)
    diff = np.abs(onnx_backend(moving, fixed) - load_backend(path, device="cpu")(moving, fixed))
    assert diff.max() <= PARITY_TOL


@pytest.mark.parametrize("mem_arena", [True, False])
def test_onnx_backend_memory_settings_and_results_independent_of_the_session(mem_arena):
    backend = OnnxBackend(exported("gather").path, device="cpu", mem_arena=mem_arena)
    moving, fixed = random_pair(seed=12)
    disp = backend._run(moving[None, None], fixed[None, None])
    # The result owns its memory: onnxruntime's array could otherwise pin the session's arena after the backend.
    assert disp.flags.owndata and disp.dtype == np.float32
    del backend
    reference = OnnxBackend(exported("gather").path, device="cpu", mem_arena=not mem_arena)
    np.testing.assert_allclose(disp[0], reference(moving, fixed), rtol=0, atol=1e-6)


def test_onnx_backend_refuses_other_shapes_and_ranks():
    backend = load_backend(exported("gather").path, device="cpu")
    moving, fixed = random_pair((32, 32, 48))
    with pytest.raises(BackendError, match=r"exported for shape \(32, 32, 32\), got \(32, 32, 48\)"):
        backend(moving, fixed)
    with pytest.raises(BackendError, match=r"moving: expected a \(D, H, W\) volume, got shape \(1, 32, 32, 32\)"):
        backend(np.zeros((1, *SHAPE), np.float32), np.zeros(SHAPE, np.float32))
    with pytest.raises(BackendError, match="differ in shape"):
        backend(np.zeros(SHAPE, np.float32), np.zeros((32, 32, 16), np.float32))


def test_onnx_gpu_request_falls_back_to_cpu_with_a_reason():
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA: no fallback to observe")
    backend = load_backend(exported("gather").path, device="cuda")
    assert backend.device == "cpu"
    assert "onnxruntime-gpu" in backend.fallback_reason and "running on CPU" in backend.fallback_reason


def test_onnx_file_without_eoir_metadata_is_refused():
    import onnx

    x = onnx.helper.make_tensor_value_info("moving", onnx.TensorProto.FLOAT, [1, 1, 2, 2, 2])
    y = onnx.helper.make_tensor_value_info("disp", onnx.TensorProto.FLOAT, [1, 1, 2, 2, 2])
    graph = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["moving"], ["disp"])], "g", [x], [y])
    path = scratch_dir() / "foreign.onnx"
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18)]), str(path))
    with pytest.raises(ValueError, match="expected eoir metadata"):
        load_backend(path, device="cpu")


def test_missing_files_are_clear_errors():
    with pytest.raises(BackendError, match="no such ONNX file"):
        load_backend(scratch_dir() / "absent.onnx")
    with pytest.raises(BackendError, match="no such TensorRT engine file"):
        load_backend(scratch_dir() / "absent.engine")


def test_engine_without_tensorrt_is_a_gpu_error():
    try:
        import tensorrt  # noqa: F401

        pytest.skip("TensorRT is installed: the missing-TensorRT path cannot be exercised")
    except ImportError:
        pass
    path = scratch_dir() / "fake.engine"
    path.write_bytes(b"not an engine")
    with pytest.raises(GpuUnavailableError, match="TensorRT is not installed"):
        load_backend(path)


def test_torch_precisions():
    with pytest.raises(BackendError, match="fp16: expected a CUDA device"):
        TorchBackend("lumir", device="cpu", precision="fp16", overrides={"channels": 4})
    with pytest.raises(BackendError, match="precision: expected one of"):
        TorchBackend("lumir", device="cpu", precision="int8", overrides={"channels": 4})  # type: ignore[arg-type]
    torch.manual_seed(0)
    fp32 = TorchBackend("lumir", device="cpu", overrides={"channels": 4})
    bf16 = TorchBackend("lumir", device="cpu", precision="bf16", overrides={"channels": 4})
    bf16.model.load_state_dict(fp32.model.state_dict())
    moving, fixed = random_pair()
    a, b = fp32(moving, fixed), bf16(moving, fixed)
    assert b.dtype == np.float32 and np.isfinite(b).all()
    # bf16 keeps 8 mantissa bits: visibly different from fp32, but far below a voxel.
    assert 0 < np.abs(a - b).max() < 0.1


def test_cuda_device_without_gpu_is_a_gpu_error():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(GpuUnavailableError, match="no CUDA GPU"):
        TorchBackend("lumir", device="cuda", overrides={"channels": 4})


@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
def test_cached_grid_sampler_matches_sample_torch(mode):
    from eoir_cli.spatial import sample_torch, sample_torch_cached

    gen = torch.Generator().manual_seed(0)
    image = torch.rand(1, 3, 6, 7, 8, generator=gen)
    # Output grid smaller than the image on every axis, displacements reaching far outside.
    disp = torch.randn(1, 3, 4, 5, 3, generator=gen) * 4
    got, expected = sample_torch_cached(image, disp, mode), sample_torch(image, disp, mode)
    assert got.shape == (1, 3, 4, 5, 3)
    assert (got - expected).abs().max() <= 1e-5
    # The grid built for autograd (a field that requires grad) and the in-place one (inference) agree
    traced = sample_torch_cached(image, disp.clone().requires_grad_(True), mode)
    assert traced.requires_grad and torch.equal(traced.detach(), got)
