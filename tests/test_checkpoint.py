"""Checkpoints: original-format .pth files against an independent re-implementation of the original
module, configuration inference, refusal of corrupt and hostile files, our .pt/.safetensors round trip."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch
from reference_original import OriginalEOIR

from eoir_cli.checkpoint import CheckpointError, eoir_to_original_state_dict, load_model, save_checkpoint
from eoir_cli.config import PRESETS
from eoir_cli.model import EOIR

TRAIN_SIZE = (32, 32, 32)
OTHER_SIZE = (48, 32, 32)
CHANNELS = 4


def _pair(size: tuple[int, int, int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(1, 1, *size, generator=gen), torch.rand(1, 1, *size, generator=gen)


def _source_model(channels: int = CHANNELS) -> EOIR:
    torch.manual_seed(5)
    model = EOIR(PRESETS["lumir"].replace(channels=channels))
    with torch.no_grad():  # make the field move several voxels so the warps inside matter
        for est in model.estimators:
            est.to_velocity.weight.mul_(20)
        for block in model.encoder:
            block.layer[2].weight.fill_(0.1 + 0.1 * torch.rand(()).item())  # PReLU slopes differ from default
    return model


def _reference(state: dict[str, torch.Tensor], size: tuple[int, int, int], channels: int = CHANNELS) -> OriginalEOIR:
    ref = OriginalEOIR(size, start_channel=channels)
    ref.load_state_dict(eoir_to_original_state_dict(state, grid_size=size), strict=True)
    return ref.eval()


def _write_original(path: Path, model: EOIR, size: tuple[int, int, int]) -> Path:
    state = eoir_to_original_state_dict(model.state_dict(), grid_size=size)
    optimizer = {"state": {}, "param_groups": [{"lr": 1e-4, "amsgrad": True, "params": list(range(3))}]}
    torch.save({"model_state_dict": state, "optimizer_state_dict": optimizer}, path)
    return path


@pytest.fixture(scope="module")
def original_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, EOIR]:
    model = _source_model()
    path = _write_original(tmp_path_factory.mktemp("ckpt") / "net_latest.pth", model, TRAIN_SIZE)
    return path, model


def test_original_state_dict_loads_strictly_into_reference(original_file: tuple[Path, EOIR]) -> None:
    _, model = original_file
    ref = OriginalEOIR(TRAIN_SIZE, start_channel=CHANNELS)
    missing, unexpected = ref.load_state_dict(
        eoir_to_original_state_dict(model.state_dict(), grid_size=TRAIN_SIZE), strict=True
    )
    assert not missing and not unexpected
    # The original layout: 10 grid buffers at the training size halved per level.
    assert tuple(ref.state_dict()["transformers.4.grid"].shape) == (1, 3, 2, 2, 2)


@pytest.mark.parametrize("size", [TRAIN_SIZE, OTHER_SIZE])
def test_load_original_pth_matches_reference_module(
    original_file: tuple[Path, EOIR], size: tuple[int, int, int]
) -> None:
    path, model = original_file
    loaded = load_model(path)
    assert loaded.checkpoint_info["format"] == "original"
    assert loaded.checkpoint_info["grid_size"] == TRAIN_SIZE
    assert loaded.config == PRESETS["lumir"].replace(channels=CHANNELS)
    # The original module is tied to its grid size: rebuild it at the size under test.
    ref = _reference(model.state_dict(), size)
    moving, fixed = _pair(size)
    with torch.no_grad():
        ours, theirs = loaded(moving, fixed), ref(moving, fixed)
    assert theirs.abs().max() > 0.5  # the warps inside the network are exercised
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-3)


def test_channels_inferred_from_original_file(tmp_path: Path) -> None:
    path = _write_original(tmp_path / "c8.pth", _source_model(channels=8), (16, 16, 16))
    model = load_model(path)
    assert model.config.channels == 8
    assert model.config.levels == 5


def test_original_pth_tar_name_loads_like_pth(tmp_path: Path) -> None:
    # The original code saves "EOIR_oasis.pth.tar"; README's `eoir test --model EOIR_oasis.pth.tar` must work.
    from eoir_cli.backends import backend_kind

    source = _source_model(channels=8)
    path = _write_original(tmp_path / "EOIR_c8.pth.tar", source, (16, 16, 16))
    assert backend_kind(path) == "torch"
    model = load_model(path)
    assert model.config.channels == 8
    moving, fixed = _pair((32, 32, 32))
    with torch.no_grad():
        torch.testing.assert_close(model(moving, fixed), source.eval()(moving, fixed), rtol=0, atol=1e-5)


def test_unknown_suffix_lists_pth_tar(tmp_path: Path) -> None:
    path = tmp_path / "model.tar"
    path.write_bytes(b"x")
    with pytest.raises(CheckpointError, match=r"unknown checkpoint suffix '\.tar'.*\.pth\.tar"):
        load_model(path)


def test_original_file_of_another_configuration_is_refused(tmp_path: Path) -> None:
    path = _write_original(tmp_path / "c8.pth", _source_model(channels=8), (16, 16, 16))
    with pytest.raises(CheckpointError, match="differs from the expected"):
        load_model(path, expect=PRESETS["lumir"])


def test_weights_that_do_not_fit_are_refused(tmp_path: Path) -> None:
    state = eoir_to_original_state_dict(_source_model().state_dict())
    del state["disp_warp_0.get_flow.bias"]
    path = tmp_path / "broken.pth"
    torch.save({"model_state_dict": state}, path)
    with pytest.raises(CheckpointError, match="weights do not fit"):
        load_model(path)


class _Hostile:
    """Unpickling this would run a shell command that creates a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("container", ["torch_zip", "raw_pickle"])
def test_hostile_pickle_is_refused_without_running(tmp_path: Path, container: str) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    payload = {"model_state_dict": {"simple_encoder.0.layer.0.weight": _Hostile(marker)}}
    if container == "torch_zip":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload, protocol=2))
    with pytest.raises(CheckpointError, match=str(path.name)):
        load_model(path)
    assert not marker.exists()


@pytest.mark.parametrize("kind", ["truncated", "random", "text", "empty"])
def test_unreadable_files_are_refused(tmp_path: Path, original_file: tuple[Path, EOIR], kind: str) -> None:
    path = tmp_path / f"{kind}.pth"
    if kind == "truncated":
        data = original_file[0].read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "random":
        path.write_bytes(torch.randint(0, 256, (4096,), dtype=torch.uint8).numpy().tobytes())
    elif kind == "text":
        path.write_text("model_state_dict: not weights\n")
    else:
        path.write_bytes(b"")
    with pytest.raises(CheckpointError, match=str(path.name)):
        load_model(path)


def test_corrupt_safetensors_and_missing_file_are_refused(tmp_path: Path) -> None:
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_model(bad)
    with pytest.raises(CheckpointError, match="no such checkpoint file"):
        load_model(tmp_path / "missing.pt")


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_our_checkpoint_round_trip(tmp_path: Path, suffix: str) -> None:
    torch.manual_seed(1)
    config = PRESETS["acdc"].replace(channels=4, int_steps=3)
    model = EOIR(config).eval()
    path = save_checkpoint(tmp_path / f"model{suffix}", model, extra={"normalization": "minmax"})
    loaded = load_model(path)
    assert loaded.config == config
    assert loaded.checkpoint_info["normalization"] == "minmax"
    moving, fixed = _pair((32, 32, 16), seed=2)
    with torch.no_grad():
        torch.testing.assert_close(loaded(moving, fixed), model(moving, fixed), rtol=0, atol=0)
    if suffix == ".pt":  # our .pt stays loadable without unpickling code
        data = torch.load(path, weights_only=True)
        assert data["format"] == "eoir" and data["config"]["int_steps"] == 3
