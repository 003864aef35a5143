"""eoir bench: result schema, derived figures, error rows, CLI + JSON."""

from __future__ import annotations

import json

import pytest
from conftest_export import CHANNELS, scratch_dir
from typer.testing import CliRunner

from eoir_cli.bench import SCHEMA, BenchSpec, _high_water_mb, matmul_peak, run_bench
from eoir_cli.cli import app
from eoir_cli.config import resolve_config
from eoir_cli.info import count_flops
from export.convert import model_for_backend

SHAPE = (32, 32, 32)
runner = CliRunner()


@pytest.fixture(scope="module")
def report():
    overrides = {"channels": CHANNELS}
    specs = [BenchSpec("lumir", "torch", SHAPE, runs=3, warmup=1, device="cpu", overrides=overrides),
             BenchSpec("lumir", "onnx", SHAPE, runs=2, warmup=0, device="cpu", overrides=overrides),
             BenchSpec("model.nii.gz", "torch", SHAPE),
             BenchSpec("lumir", "onnx", SHAPE, precision="bf16", overrides=overrides)]
    return run_bench(specs, isolate=False, prepare=model_for_backend)


def test_schema_and_machine_metadata(report):
    assert report["schema"] == SCHEMA
    machine = report["machine"]
    for key in ("cpu", "cpu_cores", "memory_gb", "gpus", "versions", "git_commit", "load_average", "date"):
        assert key in machine
    assert machine["versions"]["torch"] and machine["cpu_cores"] >= 1
    assert len(report["results"]) == 4
    json.dumps(report)  # plain data all the way down


def test_measured_rows_are_consistent(report):
    config = resolve_config("lumir", channels=CHANNELS)
    flops = count_flops(config, SHAPE)
    for row in report["results"][:2]:
        assert row["error"] is None, row["error"]
        lat = row["latency_s"]
        assert len(lat["all"]) == row["runs"]
        assert lat["p10"] <= lat["median"] <= lat["p90"] and lat["min"] > 0
        assert row["pairs_per_s"] == pytest.approx(1 / lat["median"])
        assert row["flops"] == flops
        assert row["gflops_per_s"] == pytest.approx(flops / lat["median"] / 1e9)
        assert row["peak_rss_mb"] >= row["loaded_rss_mb"] > 0
        assert row["device"] == "cpu"
    assert report["results"][1]["note"].startswith("exported from lumir (gather sampler)")


def test_rows_carry_the_measured_matmul_peak_of_their_precision(report):
    peaks = report["machine"]["matmul_peak"]["cpu"]
    assert peaks["fp32"] > 0 and peaks["bf16"] > 0 and peaks["size"] == 2048
    # The peak is the faster of the two routes (BLAS torch.mm, oneDNN) for each dtype.
    assert peaks["fp32"] == max(peaks["routes"]["fp32_mm"], peaks["routes"]["fp32_onednn"])
    for row in report["results"][:2]:  # fp32 rows
        assert row["peak_gflops_per_s"] == peaks["fp32"]
        assert row["fraction_of_peak"] == pytest.approx(row["gflops_per_s"] / peaks["fp32"])


def test_high_water_mark_is_never_below_an_earlier_sample():
    now = _high_water_mb()
    assert now is not None and now > 0
    assert _high_water_mb(now + 123.0) == now + 123.0  # a lagging VmHWM must not undercut a sample
    assert _high_water_mb(None, 1.0) >= now


def test_matmul_peak_restores_the_thread_count():
    import torch

    before = torch.get_num_threads()
    small = matmul_peak("cpu", threads=1, size=256, repeats=1)
    assert small["threads"] == 1 and torch.get_num_threads() == before
    assert set(small["routes"]) == {"fp32_mm", "fp32_onednn", "bf16_mm", "bf16_onednn"}


def test_failures_become_rows(report):
    bad_suffix, bad_precision = report["results"][2:]
    assert "unknown model suffix '.gz'" in bad_suffix["error"] and "latency_s" not in bad_suffix
    assert "bf16 is measured on the torch backend only" in bad_precision["error"]


def test_isolated_measurement_reports_child_memory():
    (row,) = run_bench([BenchSpec("lumir", "torch", SHAPE, runs=1, warmup=0, device="cpu",
                                  overrides={"channels": 2})], isolate=True, peak=False)["results"]
    assert row["error"] is None, row["error"]
    assert row["isolated"] and row["peak_rss_mb"] >= row["loaded_rss_mb"] > 0


def test_cli_bench_writes_json():
    out = scratch_dir() / "bench.json"
    result = runner.invoke(app, ["bench", "--model", "lumir", "--channels", "4", "--shape", "32", "32", "32",
                                 "--runs", "1", "--warmup", "0", "--backend", "torch", "--backend", "tensorrt",
                                 "--device", "cpu", "--no-isolate", "--json", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["schema"] == SCHEMA
    torch_row, trt_row = data["results"]
    assert torch_row["error"] is None and torch_row["config"]["channels"] == 4
    assert torch_row["peak_gflops_per_s"] == data["machine"]["matmul_peak"]["cpu"]["fp32"]
    assert "matmul peak:" in result.output
    assert trt_row["error"] is not None  # no TensorRT/GPU here, or a GPU device mismatch: a row, not a crash
    assert "eoir bench" in result.output
