"""`eoir info`, the command table, and the README/CI contract."""

from __future__ import annotations

import json
import re
from pathlib import Path

from typer.testing import CliRunner

from eoir_cli.cli import app

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def test_info_json_reports_presets_flops_and_versions() -> None:
    result = runner.invoke(app, ["info", "--json", "--shape", "32", "32", "32"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    rows = {row["preset"]: row for row in data["presets"]}
    assert set(rows) == {"lumir", "oasis", "abdomen", "acdc"}
    assert rows["lumir"]["parameters"] == 909_232  # official_checkpoint.md
    # Level-0 convolutions alone at 32^3 (per voxel, 2 FLOPs per multiply-add):
    # encoder on 2 images: 2 * 2 * 27 * (1*32 + 32*64 + 64*32) = 445,824
    # flow estimator:      2 * 27 * (64*64 + 64*27 + 27*3)     = 318,870  -> 764,694 * 32768 = 25.06 GFLOP
    assert 25.0 < rows["lumir"]["gflops"] < 25.06 * 8 / 7 + 0.1  # coarser levels add < 1/7
    assert data["versions"]["torch"]
    assert "cuda" in data["devices"]


def test_info_table_renders() -> None:
    result = runner.invoke(app, ["info", "--shape", "32", "32", "32"])
    assert result.exit_code == 0, result.output
    assert "lumir" in result.output and "909,232" in result.output
    assert "bundled default model" in result.output and "SHA-256 matches the record" in result.output


def test_info_describes_the_bundled_default_model() -> None:
    from eoir_cli.weights import provenance

    result = runner.invoke(app, ["info", "--json", "--shape", "32", "32", "32"])
    bundled = json.loads(result.output)["default_model"]
    record = provenance()
    assert bundled["present"] and bundled["sha256_ok"]
    assert bundled["path"].endswith("eoir_brain_default.safetensors")
    assert bundled["parameters"] == record["parameters"] == 90_399
    assert bundled["trained"]["steps"] == record["steps"] and bundled["command"].startswith("eoir train")
    assert 0 < bundled["dice"]["before"] < bundled["dice"]["after_default_pipeline"] < 1


def test_ci_runs_the_readme_test_command() -> None:
    ci = (ROOT / ".ci" / "run").read_text()
    readme = (ROOT / "README.md").read_text()
    commands = [line.strip() for line in ci.splitlines() if "pytest" in line]
    assert commands, ".ci/run runs no pytest command"
    for command in commands:
        assert command in readme, f"README lacks the CI test command: {command}"
    assert re.search(r"pip install .*&& eoir ", readme), "README lacks the install-and-run main-job command"
