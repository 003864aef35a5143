"""The bundled default model (weights shipped inside the package) and its provenance record."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

WEIGHTS_DIR = Path(__file__).parent
DEFAULT_WEIGHTS = WEIGHTS_DIR / "eoir_brain_default.safetensors"
PROVENANCE = WEIGHTS_DIR / "eoir_brain_default.json"


def default_model_path() -> Path:
    """Path of the bundled brain model; a clear error if this install does not ship it."""
    if not DEFAULT_WEIGHTS.is_file():
        raise FileNotFoundError(
            f"the bundled default model is missing ({DEFAULT_WEIGHTS}); reinstall eoir or pass --model"
        )
    return DEFAULT_WEIGHTS


def provenance() -> dict[str, Any]:
    """The provenance record of the bundled model (command, commit, data, seed, validation)."""
    return json.loads(PROVENANCE.read_text())


def sha256(path: Path) -> str:
    """Hex SHA-256 of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
