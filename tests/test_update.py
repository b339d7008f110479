"""Update files: round trips, and every kind of bad file refused with an error naming the problem."""

from __future__ import annotations

import json
import pickle
import struct

import pytest
import torch
from safetensors.torch import save as raw_save

from gradleak import DataSpec, SharedUpdate, ThreatModel, fedavg_update, fedsgd_update, load_update, save_update
from gradleak.errors import ConfigError, UpdateFileError
from gradleak.models import MLP, build_model, model_from_info, model_info
from gradleak.update_file import _digest, _flat_tensors


@pytest.fixture()
def model():
    torch.manual_seed(0)
    return MLP(3 * 32 * 32, hidden=(32,), num_classes=10)


@pytest.fixture()
def update(model, photos):
    return fedsgd_update(model, photos.images[:2], photos.labels[:2], share_labels=True,
                         spec=DataSpec.from_images(photos.images),
                         model_info=model_info("mlp", (3, 32, 32), 10, 0, hidden=(32,)))


def _write_raw(path, tensors, metadata):
    """A file with a *valid* digest: what a careless or hostile client could produce."""
    header = {"gradleak": json.dumps(metadata), "sha256": _digest(metadata, tensors)}
    path.write_bytes(raw_save(tensors, metadata=header))
    return path


def test_gradient_round_trip_is_bit_exact(tmp_path, model, update):
    path = save_update(update, tmp_path / "u.safetensors")
    loaded = load_update(path, model)
    assert loaded.kind == "gradient" and loaded.batch_size == 2 and loaded.loss == "cross_entropy"
    assert loaded.labels.tolist() == update.labels.tolist()
    assert loaded.data_spec == update.data_spec and loaded.input_shape == (3, 32, 32)
    assert loaded.parameters == update.parameters and loaded.model == update.model
    for name in update.tensors:
        assert torch.equal(loaded.tensors[name], update.tensors[name])
        assert torch.equal(loaded.weights[name], update.weights[name])


def test_fedavg_delta_round_trip_keeps_local_training_metadata(tmp_path, model, photos):
    delta = fedavg_update(model, photos.images[:4], photos.labels[:4], lr=0.05, epochs=2, local_batch_size=2, seed=3)
    loaded = load_update(save_update(delta, tmp_path / "d.safetensors"), model)
    assert (loaded.kind, loaded.local_steps, loaded.local_epochs, loaded.local_batch_size, loaded.local_lr) == \
        ("delta", 4, 2, 2, 0.05)
    assert loaded.labels is None  # not shared by default


def test_a_flipped_byte_is_detected(tmp_path, model, update):
    path = save_update(update, tmp_path / "u.safetensors")
    data = bytearray(path.read_bytes())
    data[-10] ^= 0x01  # inside the last tensor's bytes
    path.write_bytes(bytes(data))
    with pytest.raises(UpdateFileError, match="checksum mismatch"):
        load_update(path, model)


def test_edited_metadata_is_detected(tmp_path, model, update):
    path = save_update(update, tmp_path / "u.safetensors")
    data = path.read_bytes()
    edited = data.replace(b'\\"batch_size\\": 2', b'\\"batch_size\\": 1')
    assert edited != data
    path.write_bytes(edited)
    with pytest.raises(UpdateFileError, match="checksum mismatch"):
        load_update(path)


@pytest.mark.parametrize("keep", [0, 5, 100, 0.5])
def test_truncated_files_are_refused(tmp_path, update, keep):
    path = save_update(update, tmp_path / "u.safetensors")
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep) if isinstance(keep, float) else keep])
    with pytest.raises(UpdateFileError, match="truncated|too short|malformed"):
        load_update(path)


def test_wrong_model_names_the_entry_and_both_shapes(tmp_path, update):
    path = save_update(update, tmp_path / "u.safetensors")
    other = MLP(3 * 32 * 32, hidden=(16,), num_classes=10)
    with pytest.raises(UpdateFileError, match=r"'layers\.fc1\.weight': shape \(32, 3072\) but the model's parameter has shape \(16, 3072\)"):
        load_update(path, other)
    deeper = MLP(3 * 32 * 32, hidden=(32, 8), num_classes=10)
    with pytest.raises(UpdateFileError, match="'layers.fc2.weight'"):
        load_update(path, deeper)


def test_tensor_shape_disagreeing_with_declared_parameters(tmp_path, update):
    tensors = _flat_tensors(update)
    tensors["update/layers.fc2.bias"] = torch.zeros(11)
    _write_raw(tmp_path / "u.safetensors", tensors, update.metadata())
    with pytest.raises(UpdateFileError, match=r"update\['layers.fc2.bias'\]: shape \(11,\) != parameter shape \(10,\)"):
        load_update(tmp_path / "u.safetensors")


def test_nan_and_inf_are_refused_in_files_and_in_memory(tmp_path, update):
    tensors = _flat_tensors(update)
    tensors["update/layers.fc1.bias"][3] = float("nan")
    tensors["update/layers.fc1.bias"][4] = float("inf")
    _write_raw(tmp_path / "u.safetensors", tensors, update.metadata())
    with pytest.raises(UpdateFileError, match=r"update\['layers.fc1.bias'\]: 2 of 32 values are NaN or infinite"):
        load_update(tmp_path / "u.safetensors")
    with pytest.raises(UpdateFileError, match="NaN"):
        SharedUpdate({"w": torch.tensor([1.0, float("nan")])})


def test_integer_gradient_and_unknown_entries_are_refused(tmp_path, update):
    tensors = _flat_tensors(update)
    tensors["update/layers.fc2.bias"] = torch.zeros(10, dtype=torch.int32)
    _write_raw(tmp_path / "a.safetensors", tensors, update.metadata())
    with pytest.raises(UpdateFileError, match="'layers.fc2.bias'.*not a floating-point dtype"):
        load_update(tmp_path / "a.safetensors")
    tensors = _flat_tensors(update)
    tensors["payload"] = torch.zeros(3)
    _write_raw(tmp_path / "b.safetensors", tensors, update.metadata())
    with pytest.raises(UpdateFileError, match="unexpected entry 'payload'"):
        load_update(tmp_path / "b.safetensors")


class _Explode:
    def __reduce__(self):
        return (exec, ("open('PWNED', 'w').write('x')",))


def test_pickle_and_torch_save_files_are_refused_and_never_executed(tmp_path, monkeypatch, update):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "evil.pkl").write_bytes(pickle.dumps({"fc1.weight": _Explode()}))
    with pytest.raises(UpdateFileError, match="looks like a Python pickle"):
        load_update(tmp_path / "evil.pkl")
    torch.save(dict(update.tensors), tmp_path / "grads.pt")
    with pytest.raises(UpdateFileError, match="zip archive"):
        load_update(tmp_path / "grads.pt")
    assert not (tmp_path / "PWNED").exists()


def test_plain_safetensors_without_gradleak_metadata(tmp_path):
    (tmp_path / "plain.safetensors").write_bytes(raw_save({"w": torch.ones(2)}))
    with pytest.raises(UpdateFileError, match="not a gradleak update file"):
        load_update(tmp_path / "plain.safetensors")


def test_garbage_header_length_and_missing_file(tmp_path):
    (tmp_path / "x.safetensors").write_bytes(struct.pack("<Q", 2**40) + b"{}")
    with pytest.raises(UpdateFileError, match="header length"):
        load_update(tmp_path / "x.safetensors")
    with pytest.raises(UpdateFileError, match="not found"):
        load_update(tmp_path / "missing.safetensors")


def test_metadata_with_wrong_types_names_the_key(tmp_path, update):
    metadata = update.metadata() | {"batch_size": "two"}
    _write_raw(tmp_path / "u.safetensors", _flat_tensors(update), metadata)
    with pytest.raises(UpdateFileError, match="'batch_size' has type str"):
        load_update(tmp_path / "u.safetensors")


def test_labels_count_must_match_batch_size(update):
    with pytest.raises(UpdateFileError, match="3 labels for batch_size=2"):
        SharedUpdate(update.tensors, batch_size=2, labels=torch.tensor([1, 2, 3]))


def test_threat_model_strips_what_it_does_not_grant(update):
    seen = ThreatModel(labels_known=False, batch_size_known=False).observe(update)
    assert seen.labels is None and seen.batch_size is None
    assert ThreatModel(labels_known=True).observe(update).labels.tolist() == update.labels.tolist()
    unlabeled = SharedUpdate(update.tensors, batch_size=2)
    with pytest.raises(ConfigError, match="grants labels, but the update carries none"):
        ThreatModel(labels_known=True).observe(unlabeled)


def test_zoo_model_rebuilds_from_its_description():
    info = model_info("mlp", (1, 8, 8), 10, seed=7, hidden=(12,))
    a, b = model_from_info(info), build_model("mlp", (1, 8, 8), 10, seed=7, hidden=(12,))
    for (name, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), name


def test_non_standard_json_constants_in_metadata_are_refused(tmp_path, update):
    """NaN/Infinity are not JSON: a header carrying them (with a valid digest) is refused, not parsed."""
    metadata = update.metadata() | {"extra": {"privacy": {"epsilon": float("inf")}}}
    _write_raw(tmp_path / "u.safetensors", _flat_tensors(update), metadata)
    with pytest.raises(UpdateFileError, match="non-standard JSON constant 'Infinity'"):
        load_update(tmp_path / "u.safetensors")
