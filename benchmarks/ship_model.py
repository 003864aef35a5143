"""Ship a training run as the bundled default brain model, with its provenance record and learning curve.

Copies ``RUN/model.safetensors`` (or the weights of ``RUN/best.pt``) to ``eoir_cli/weights/``, writes the
record ``eoir_brain_default.json`` (the ``eoir train`` command that reproduces the run, commit, steps,
data, held-out subjects, seed, training time, SHA-256, validation numbers from a
``bench_default_pipeline.py`` JSON) and keeps the learning curve (``curves.png``) beside it. The small
resumable checkpoint (``last.pt``) and the run record (``config.json``, ``metrics.csv``) go to
``benchmarks/training/NAME/`` so that a later session continues the run with ``eoir train --resume``.

Example:
    python benchmarks/ship_model.py /work/runs/brain_c8 --bench benchmarks/results/new_model.json \\
        --machine "2-core x86_64 CPU (AMD EPYC, AVX512-BF16), no GPU, torch 2.13.0+cpu"
"""

from __future__ import annotations

import argparse
import datetime
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def train_command(train: dict[str, Any]) -> str:
    """The ``eoir train`` command line that builds ``train`` (a stored TrainConfig dict), defaults omitted."""
    from eoir_cli.config import TrainConfig

    defaults = TrainConfig().to_dict()
    parts = ["eoir train"]
    repeat = {"windows": "--window", "holdout": "--holdout"}
    skip = {"resume", "device", "num_workers", "log_every"}
    for key, value in train.items():
        if key in skip or value == defaults.get(key) or value is None:
            continue
        flag = "--" + key.replace("_", "-")
        if key in repeat:
            parts += [f"{repeat[key]} {v}" for v in value]
        elif key == "shape":
            parts.append(f"{flag} {' '.join(str(v) for v in value)}")
        elif isinstance(value, bool):
            parts.append(flag if value else f"--no-{key.replace('_', '-')}")
        else:
            parts.append(f"{flag} {value}")
    return " ".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="training run directory")
    parser.add_argument("--bench", type=Path, required=True, help="bench_default_pipeline.py JSON of this model")
    parser.add_argument("--name", default="brain_default", help="folder under benchmarks/training/")
    parser.add_argument("--machine", required=True, help="the machine the run trained on, in words")
    parser.add_argument("--checkpoint", default="model.safetensors", help="file of RUN to ship")
    parser.add_argument("--default-setting", default="network+affine+refine2",
                        help="the --bench summary row that is the default pipeline")
    args = parser.parse_args()

    import torch

    from eoir_cli.checkpoint import load_model, save_checkpoint
    from eoir_cli.model import count_parameters
    from eoir_cli.weights import DEFAULT_WEIGHTS, PROVENANCE, sha256

    config = json.loads((args.run / "config.json").read_text())
    last = torch.load(args.run / "last.pt", map_location="cpu", weights_only=True)
    source = args.run / args.checkpoint
    model = load_model(str(source))
    from eoir_cli.checkpoint import read_checkpoint

    deployment = read_checkpoint(str(source))[2].get("deployment")
    if source.suffix == ".safetensors":  # written by eoir train with its deployment facts: ship it as is
        shutil.copyfile(source, DEFAULT_WEIGHTS)
    else:
        stored = torch.load(source, map_location="cpu", weights_only=True)
        save_checkpoint(DEFAULT_WEIGHTS, model, extra={
            "train_step": int(stored["step"]), "dataset": config["train"]["dataset"],
            "normalization": stored.get("normalization"), "deployment": stored.get("deployment")})
    curves = PROVENANCE.with_name("eoir_brain_default_curves.png")
    shutil.copyfile(args.run / "curves.png", curves)
    keep = ROOT / "benchmarks" / "training" / args.name
    keep.mkdir(parents=True, exist_ok=True)
    for name in ("last.pt", "config.json", "metrics.csv", "curves.png"):
        shutil.copyfile(args.run / name, keep / name)

    bench = json.loads(args.bench.read_text())
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                            check=False).stdout.strip()
    train = config["train"]
    record = {
        "name": "eoir_brain_default",
        "file": DEFAULT_WEIGHTS.name,
        "sha256": sha256(DEFAULT_WEIGHTS),
        "bytes": DEFAULT_WEIGHTS.stat().st_size,
        "command": train_command({**train, "steps": int(last["step"])}),
        "reproduce": train_command({**train, "steps": int(last["step"])})
        + f" && python benchmarks/ship_model.py {train['out']} --bench BENCH.json --machine '...'",
        "resume": f"eoir train --resume benchmarks/training/{args.name} --out runs/{args.name}",
        "commit": commit,
        "model_config": model.config.to_dict(),
        "deployment": deployment,
        "parameters": count_parameters(model),
        "steps": int(last["step"]),
        "shipped_checkpoint": args.checkpoint,
        "seed": train["seed"],
        "train_seconds": round(float(last["elapsed_s"]), 1),
        "machine": args.machine,
        "data": "synth generator (eoir_cli/data/synth.py) on ../shared/data without the held-out subjects: label "
                "maps of the other brain_lumirlike subjects and the MNI152 tissue map, plus random smooth shapes; "
                f"{train['real_fraction']:.0%} deformed real-image pairs; {train['flip_fraction']:.0%} of label-map "
                "pairs mirrored left-right; generated at the network size; bf16 autocast on CPU "
                f"(amp={train['amp']}); NCC windows {train['windows']} + l2 smoothness + soft Dice, deep "
                f"supervision, Adam (amsgrad) lr {train['lr']} with poly decay.",
        "held_out": list(train.get("holdout") or []),
        "learning_curve": curves.name,
        "training_validation": {
            "metric": "mean Dice (31 labels) of the network alone on the held-out subject's real pairs",
            "best": last.get("best_metric"),
        },
        "validation": {
            "pairs": [f"{r['moving']} -> {r['fixed']}" for r in bench["rows"] if r["setting"] == args.default_setting],
            "labels": f"{len(bench['labels'])} FreeSurfer labels (SYNBRAIN_dataset.json labels_eval)",
            "default_setting": args.default_setting,
            "summary": bench["summary"],
            "date": datetime.date.today().isoformat(),
        },
    }
    PROVENANCE.write_text(json.dumps(record, indent=1) + "\n")
    print(f"shipped {source} -> {DEFAULT_WEIGHTS} ({record['bytes']} bytes, sha256 {record['sha256'][:12]})")


if __name__ == "__main__":
    main()
