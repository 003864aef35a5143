"""ONNX export: graph checks, parity with PyTorch, metadata, dynamic shapes, TensorRT report, CLI."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest_export import CHANNELS, PARITY_TOL, SHAPE, exported, random_pair, scratch_dir, tiny_model, torch_disp
from typer.testing import CliRunner

from eoir_cli.cli import app
from eoir_cli.deployment import preset_deployment
from eoir_cli.metadata import parse_metadata
from export.onnx_export import ExportError, torch2onnx, verification_bounds, verify_onnx
from export.trt_support import check_trt_support

runner = CliRunner()


def _ort_disp(path, moving, fixed):
    from eoir_cli.backends import OnnxBackend

    return OnnxBackend(path, device="cpu")(moving, fixed)


@pytest.mark.parametrize("sampler", ["gather", "native"])
def test_export_passes_checker_and_matches_pytorch(sampler):
    result = exported(sampler)
    onnx.checker.check_model(onnx.load(str(result.path)), full_check=True)
    assert result.verify["max_abs"] <= PARITY_TOL
    # An independent pair, not the one torch2onnx verified on.
    moving, fixed = random_pair(seed=7)
    diff = np.abs(_ort_disp(result.path, moving, fixed) - torch_disp(tiny_model(), moving, fixed))
    assert diff.max() <= PARITY_TOL
    # The comparison is meaningful only if the network actually moves voxels.
    assert np.abs(torch_disp(tiny_model(), moving, fixed)).max() > 0.01


def test_gather_graph_has_no_gridsample_and_int32_indices():
    proto = onnx.load(str(exported("gather").path))
    ops = {n.op_type for n in proto.graph.node}
    assert "GridSample" not in ops and "GatherElements" not in ops
    inferred = onnx.shape_inference.infer_shapes(proto)
    types = {vi.name: vi.type.tensor_type.elem_type for vi in inferred.graph.value_info}
    sample_gathers = [n for n in proto.graph.node if n.op_type == "Gather" and
                      next((a.i for a in n.attribute if a.name == "axis"), 0) == 1]
    # 5 levels; each level: 1 feature warp (none at the coarsest) + 7 integration steps + 1 compose = 43 warps,
    # 8 corners each.
    assert len(sample_gathers) == 43 * 8
    assert {types[n.input[1]] for n in sample_gathers} == {onnx.TensorProto.INT32}


def test_native_graph_uses_opset20_gridsample():
    proto = onnx.load(str(exported("native").path))
    grid_samples = [n for n in proto.graph.node if n.op_type == "GridSample"]
    assert len(grid_samples) == 43
    assert max(o.version for o in proto.opset_import if o.domain == "") == 20
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in grid_samples[0].attribute}
    assert attrs["align_corners"] == 1 and attrs["mode"] == b"linear" and attrs["padding_mode"] == b"zeros"


@pytest.mark.parametrize("sampler", ["gather", "native"])
def test_no_initializer_larger_than_the_weights_need(sampler):
    proto = onnx.load(str(exported(sampler).path))
    largest_param = max(p.numel() for p in tiny_model().parameters())
    sizes = [int(np.prod(i.dims)) for i in proto.graph.initializer]
    # An identity grid at 32³ would be 3 × 32768 elements; weights top out at 27 × 8 × 27 = 5832.
    assert max(sizes) <= largest_param
    params = sum(p.numel() for p in tiny_model().parameters())
    assert sum(sizes) < params + 2000  # weights + small ramps/scalars only


def test_metadata_round_trip():
    from eoir_cli import __version__
    from eoir_cli.backends import load_backend

    result = exported("gather")
    proto = onnx.load(str(result.path))
    meta = parse_metadata({p.key: p.value for p in proto.metadata_props})
    assert meta["config"] == tiny_model().config
    assert meta["config"].channels == CHANNELS
    assert meta["input_shape"] == SHAPE and meta["dynamic"] is False
    assert meta["sampler"] == "gather" and meta["opset"] == 18 and meta["precision"] == "fp32"
    facts = preset_deployment("lumir")  # the model is the lumir preset: its facts travel into the file
    assert meta["normalization"] == facts.normalization.describe() and meta["eoir_version"] == __version__
    assert meta["disp_units"] == "voxels" and meta["deployment"] == facts.to_dict()
    backend = load_backend(result.path, device="cpu")
    assert backend.config == tiny_model().config and backend.input_shape == SHAPE
    assert backend.deployment == facts and backend.deployment.source == "model file"


def test_dynamic_export_runs_at_two_sizes():
    from eoir_cli.backends import load_backend

    result = exported("gather", dynamic=True)
    backend = load_backend(result.path, device="cpu")
    assert backend.input_shape is None
    for shape in [(32, 32, 48), (48, 32, 32)]:
        moving, fixed = random_pair(shape, seed=3)
        disp = backend(moving, fixed)
        assert disp.shape == (3, *shape)
        assert np.abs(disp - torch_disp(tiny_model(), moving, fixed)).max() <= PARITY_TOL


def test_fp16_export_is_float16_and_close_to_fp32():
    result = exported("gather", fp16=True)
    proto = onnx.load(str(result.path))
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    assert {i.data_type for i in proto.graph.initializer if i.name.endswith("weight")} == {onnx.TensorProto.FLOAT16}
    moving, fixed = random_pair(seed=5)
    diff = np.abs(_ort_disp(result.path, moving, fixed) - torch_disp(tiny_model(), moving, fixed))
    assert diff.max() < 0.05  # fp16 rounding through 43 warps; measured ~2e-3 voxels


def test_verification_failure_leaves_no_file():
    out = scratch_dir() / "bad.onnx"
    with pytest.raises(ExportError, match="verification failed: max"):
        torch2onnx(tiny_model(), out, shape=SHAPE, tolerance=-1.0)  # nothing is below a negative tolerance
    assert list(out.parent.iterdir()) == []


def _break(kind: str):
    """A deliberately wrong copy of a good tiny export (what verification exists to catch)."""
    from onnx import helper, numpy_helper

    proto = onnx.load(str(exported("native" if kind == "wrong sampler" else "gather").path))
    graph = proto.graph
    if kind == "swapped axes":  # components of the displacement in (H, D, W) order instead of (D, H, W)
        producer = next(n for n in graph.node if "disp" in n.output)
        producer.output[list(producer.output).index("disp")] = "disp_dhw"
        graph.initializer.append(numpy_helper.from_array(np.array([1, 0, 2], dtype=np.int64), "swap_hd"))
        graph.node.append(helper.make_node("Gather", ["disp_dhw", "swap_hd"], ["disp"], axis=1))
    elif kind == "wrong sampler":  # GridSample with align_corners=0: samples half a voxel off, scaled
        for node in graph.node:
            if node.op_type == "GridSample":
                next(a for a in node.attribute if a.name == "align_corners").i = 0
    elif kind == "broken op":  # the flow estimator's first ReLU at the finest level does nothing
        relu = [n for n in graph.node if n.op_type == "Relu"][-2]
        relu.op_type = "Identity"
    path = scratch_dir() / f"{kind.replace(' ', '_')}.onnx"
    onnx.save_model(proto, str(path))
    return path


@pytest.mark.parametrize("kind", ["swapped axes", "wrong sampler", "broken op"])
def test_verification_rejects_a_broken_export(kind):
    report = verify_onnx(_break(kind), tiny_model(), SHAPE)
    assert not report["passed"]
    assert report["max_abs"] > report["tolerance_max"]
    # The bar was derived from PyTorch's own float32 spread, orders of magnitude below the broken difference.
    assert report["tolerance_max"] == verification_bounds(report["spread_max"])[0]
    assert report["max_abs"] > 10 * report["tolerance_max"] or report["mean_abs"] > report["tolerance_mean"]


def test_good_export_passes_with_room_to_spare():
    report = exported("gather").verify
    assert report["passed"] and report["max_abs"] < report["tolerance_max"] / 10


def test_verification_bounds_follow_the_rounding_spread():
    # 100x the spread, clamped to [1e-3, 0.1] voxels; the mean bar is that, at most 0.01 voxel.
    assert verification_bounds(1e-7) == (1e-3, 1e-3)
    assert verification_bounds(5e-5) == pytest.approx((5e-3, 5e-3))
    assert verification_bounds(3e-4) == pytest.approx((3e-2, 1e-2))
    assert verification_bounds(0.5) == (0.1, 0.01)


def test_bad_shape_and_opset_are_refused_before_exporting():
    out = scratch_dir() / "x.onnx"
    with pytest.raises(ExportError, match=r"expected multiples of \(16, 16, 16\)"):
        torch2onnx(tiny_model(), out, shape=(30, 32, 32))
    with pytest.raises(ExportError, match="5-D GridSample needs opset 20"):
        torch2onnx(tiny_model(), out, shape=SHAPE, sampler="native", opset=18)
    with pytest.raises(ExportError, match="expected a .onnx path"):
        torch2onnx(tiny_model(), out.with_suffix(".pt"), shape=SHAPE)
    assert not out.exists()


def test_trt_report_gather_parses_on_trt10_native_needs_11_2():
    gather = check_trt_support(onnx.load(str(exported("gather").path)))
    native = check_trt_support(onnx.load(str(exported("native").path)))
    assert "10.x" in gather["parsable_by"] and "11.2+" in gather["parsable_by"]
    assert native["parsable_by"] == ["11.2+"]
    assert "GridSample" in native["not_parsable_by"]["10.x"]
    assert "TensorRT 10.0" in gather["assumes"]


def test_trt_report_flags_unknown_ops():
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4])
    graph = onnx.helper.make_graph([onnx.helper.make_node("Foo", ["x"], ["y"], domain="custom")], "g", [x], [y])
    report = check_trt_support(onnx.helper.make_model(graph))
    assert report["parsable_by"] == []
    assert report["ops"]["custom::Foo"]["count"] == 1


# ---------------------------------------------------------------------------------------------- CLI


def _checkpoint(tmp_path, normalization="percentile 0.5-99.5 then [0,1]"):
    from eoir_cli.checkpoint import save_checkpoint

    return save_checkpoint(tmp_path / "tiny.pt", tiny_model(), extra={"normalization": normalization})


def test_cli_export_end_to_end_with_verify(tmp_path):
    ckpt = _checkpoint(tmp_path)
    out = tmp_path / "out" / "tiny.onnx"
    result = runner.invoke(app, ["export", str(ckpt), "-o", str(out), "--shape", "32", "32", "32"])
    assert result.exit_code == 0, result.output
    assert "max |Δdisp|" in result.output and "can parse this file" in result.output
    meta = parse_metadata({p.key: p.value for p in onnx.load(str(out)).metadata_props})
    assert meta["normalization"] == "percentile 0.5-99.5 then [0,1]"
    assert meta["config"].channels == CHANNELS
    assert meta["model_config"]["levels"] == 5


def test_cli_trt_without_tensorrt_writes_the_onnx_and_says_what_to_run(tmp_path):
    try:
        import tensorrt  # noqa: F401
        import torch

        if torch.cuda.is_available():
            pytest.skip("TensorRT and a GPU are present: the failure path cannot be exercised here")
    except ImportError:
        pass
    ckpt = _checkpoint(tmp_path)
    out = tmp_path / "t.onnx"
    result = runner.invoke(app, ["export", str(ckpt), "-o", str(out), "--shape", "32", "32", "32", "--trt"],
                           env={"COLUMNS": "300"})
    assert result.exit_code == 1
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("error:") and ("TensorRT" in last or "GPU" in last)
    assert f"Wrote {out} only" in last and f"eoir export {out} --trt" in last
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.onnx", "tiny.pt"]
    assert onnx.load(str(out)).graph.output[0].name == "disp"
    # The printed command, run here, fails with one line (no TensorRT), not a traceback.
    again = runner.invoke(app, ["export", str(out), "--trt"])
    assert again.exit_code == 1 and again.output.startswith("error:") and "Traceback" not in again.output
    plain = runner.invoke(app, ["export", str(out)])
    assert plain.exit_code == 1 and "already an ONNX file: pass --trt" in plain.output


def test_cli_bad_shape_is_one_line(tmp_path):
    ckpt = _checkpoint(tmp_path)
    result = runner.invoke(app, ["export", str(ckpt), "-o", str(tmp_path / "b.onnx"), "--shape", "30", "32", "32"])
    assert result.exit_code == 1
    assert "expected multiples of (16, 16, 16)" in result.output
    assert not (tmp_path / "b.onnx").exists()


def test_trt_engine_build_and_run():
    trt = pytest.importorskip("tensorrt", reason="TensorRT is not installed (GPU-only optional dependency)")
    import torch

    if not torch.cuda.is_available():
        pytest.skip("TensorRT engines need a CUDA GPU")
    from eoir_cli.backends import load_backend
    from export.tensorrt import onnx2engine

    engine = onnx2engine(exported("gather").path, scratch_dir() / "tiny.engine")
    backend = load_backend(engine)
    moving, fixed = random_pair(seed=2)
    assert np.abs(backend(moving, fixed) - torch_disp(tiny_model(), moving, fixed)).max() <= 1e-3
    assert backend.metadata["tensorrt_version"] == trt.__version__


def test_cli_verify_with_real_brains(tmp_path, shared_data):
    images = shared_data / "brain_lumirlike" / "imagesTr"
    ckpt = _checkpoint(tmp_path)
    out = tmp_path / "real.onnx"
    result = runner.invoke(app, ["export", str(ckpt), "-o", str(out), "--shape", "32", "32", "32", "--verify-with",
                                 str(images / "SYNBRAIN_0001_0000.nii.gz"), str(images / "SYNBRAIN_0002_0000.nii.gz")])
    assert result.exit_code == 0, result.output
    assert "the given image pair" in result.output and out.is_file()


def test_default_tensorrt_profile_brackets_the_example_shape():
    from export.tensorrt import EngineBuildError, _profile_shapes

    meta = {"config": tiny_model().config, "example_shape": [160, 224, 192]}
    lo, opt, hi = _profile_shapes(meta, None)
    # min = 2 × 16 per axis; max = 1.5 × example rounded up to 16: 240, 336, 288.
    assert lo == (32, 32, 32) and opt == (160, 224, 192) and hi == (240, 336, 288)
    with pytest.raises(EngineBuildError, match="expected three"):
        _profile_shapes(meta, [(32, 32, 32)])
