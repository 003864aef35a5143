"""benchmarks/gpu_check.py: its CPU dry run exercises every row and writes the JSON a GPU run would."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


@pytest.fixture(scope="module")
def dry_report(tmp_path_factory: pytest.TempPathFactory) -> dict:
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path_factory.mktemp("gpu") / "check.json"
    assert module.main(["--dry-run", "--json", str(out)]) == 0
    return json.loads(out.read_text())


def test_dry_run_reports_every_row_with_a_status(dry_report: dict) -> None:
    assert dry_report["schema"] == "eoir-gpu-check/1" and dry_report["dry_run"] is True
    rows = {r["row"]: r for r in dry_report["rows"]}
    assert len(rows) == 11
    assert all(r["status"] in ("ok", "skipped") for r in rows.values()), [r for r in rows.values()
                                                                         if r["status"] == "error"]
    # Rows that cannot run on a CPU say why instead of failing.
    assert rows["torch fp16 (inference path)"]["reason"].startswith("fp16 is a CUDA row")
    trt = rows["TensorRT fp16 (gather export)"]
    assert trt["status"] == "skipped" and ("tensorrt" in trt["reason"] or "CUDA" in trt["reason"])


def test_dry_run_parity_and_training_figures(dry_report: dict) -> None:
    rows = {r["row"]: r for r in dry_report["rows"]}
    fp32 = rows["torch fp32 (inference path)"]
    assert fp32["max_abs_vs_fp32"] == 0.0 and fp32["median_s"] > 0 and fp32["disp_max"] > 0
    assert rows["torch bf16 (inference path)"]["max_abs_vs_fp32"] < 0.1
    for name in ("plain fp32 (original graph)", "torch.compile fp32 (plain graph)",
                 "ONNX Runtime gather (CPU, dry run)"):
        assert rows[name]["status"] == "ok" and rows[name]["max_abs_vs_fp32"] < 1e-3, rows[name]
    train = rows["AMP training step"]
    assert train["status"] == "ok" and train["median_s"] > 0 and train["size"] == [32, 32, 32]
