"""File names and atomic output: every file eoir writes appears whole or not at all."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` when the block succeeds.

    On any exception the temporary file is removed and ``path`` is left as it was, so a crash,
    Ctrl-C or a full disk never leaves a truncated output behind. The temporary name keeps the
    final suffixes (``.nii.gz``, ``.onnx``) because some writers choose the format by suffix.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name.split('.')[0]}-", suffix=suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        # mkstemp creates 0600 files; give the output the permissions a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text_atomic(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` to ``path`` atomically and return the path."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json_atomic(path: str | os.PathLike[str], data: Any) -> Path:
    """Write ``data`` as indented JSON atomically and return the path."""
    return write_text_atomic(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def model_suffix(path: str | os.PathLike[str]) -> str:
    """The suffix that names a model file's format, lower case; ``.pth.tar`` (the original EOIR
    code's checkpoint names) counts as one suffix."""
    name = Path(path).name.lower()
    return ".pth.tar" if name.endswith(".pth.tar") else Path(name).suffix


def check_output_dir(path: str | os.PathLike[str], what: str) -> Path:
    """Check, before any computation, that ``path`` is or can become a folder we may write in.

    Nothing is created. Raises ``EoirError`` naming ``what`` (e.g. ``--out``) when ``path`` is an
    existing file, when a parent on the way is a file, or when the nearest existing folder is not
    writable.
    """
    from eoir_cli.errors import EoirError

    path = Path(path)
    if path.exists() and not path.is_dir():
        raise EoirError(f"{what} {path}: expected a folder, got an existing file")
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise EoirError(f"{what} {path}: cannot create it, {probe} is a file")
    if probe.exists() and not os.access(probe, os.W_OK | os.X_OK):
        raise EoirError(f"{what} {path}: {probe} is not writable")
    return path
