"""Regression tests for the hostile update files of the hardening review (issue 10).

Each test reproduces one defect found by a hostile tester: valid files refused, metadata
that drove allocations, exceptions other than UpdateFileError escaping, partial updates.
"""

from __future__ import annotations

import json
import struct
import time

import pytest
import torch
from safetensors.torch import save as raw_save
from typer.testing import CliRunner

from gradleak import DataSpec, SharedUpdate, fedavg_update, fedsgd_update, load_update, save_update
from gradleak.cli import app
from gradleak.errors import ConfigError, UpdateFileError
from gradleak.models import build_model, model_from_info, model_info
from gradleak.update_file import _digest, _flat_tensors


@pytest.fixture()
def lenet():
    return build_model("lenet", (3, 32, 32), 10)


@pytest.fixture()
def update(lenet, photos):
    return fedsgd_update(lenet, photos.images[:1], photos.labels[:1], share_labels=True,
                         spec=DataSpec.from_images(photos.images), model_info=model_info("lenet", (3, 32, 32), 10, 0))


def _header_length(path) -> int:
    return struct.unpack("<Q", path.read_bytes()[:8])[0]


def _signed(path, tensors, metadata_text: str):
    """A file with a valid digest for this metadata text: what a hostile client can always produce."""
    digest = _digest(json.loads(metadata_text), tensors)
    path.write_bytes(raw_save(tensors, metadata={"gradleak": metadata_text, "sha256": digest}))
    return path


def _refused(path, *needles, model=None):
    with pytest.raises(UpdateFileError) as info:
        load_update(path, model)
    message = str(info.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, message
    return message


# ---------------------------------------------------------------- valid files that were refused
@pytest.mark.parametrize("low_bytes", [0x80, 0x6428, 0x6C28])  # 0x80, "(d", "(l" as the header length's first bytes
def test_valid_files_whose_header_length_looks_like_a_pickle_opcode_load(tmp_path, update, low_bytes):
    """safetensors pads headers to 8 bytes, so 1 in 32 header lengths is 128 mod 256: its first
    byte 0x80 is a pickle's PROTO opcode. Such files are valid and must load."""
    mask = 0xFF if low_bytes < 0x100 else 0xFFFF
    path = tmp_path / "u.safetensors"
    save_update(SharedUpdate(**{**vars(update), "extra": {"pad": ""}}), path)
    start = max(0, low_bytes - _header_length(path) - 16)  # the header grows by one byte per padding character
    for pad in range(start, start + 600):
        save_update(SharedUpdate(**{**vars(update), "extra": {"pad": "x" * pad}}), path)
        if _header_length(path) & mask == low_bytes:
            break
    else:
        pytest.fail("no padding produced the header length")
    assert path.read_bytes()[:1] in (b"\x80", b"(")
    loaded = load_update(path)
    assert torch.equal(loaded.tensors["fc.weight"], update.tensors["fc.weight"])


def test_every_header_length_residue_loads(tmp_path, lenet, photos):
    """The issue's reproducer, widened: real LeNet FedAvg updates (epochs=1, local batch 1) with
    header lengths covering every multiple of 8 mod 256: all load."""
    base = fedavg_update(lenet, photos.images[:2], photos.labels[:2], lr=0.05, epochs=1, local_batch_size=1,
                         model_info=model_info("lenet", (3, 32, 32), 10, 0))
    residues = set()
    for pad in range(256):
        path = save_update(SharedUpdate(**{**vars(base), "extra": {"p": "x" * pad}}), tmp_path / f"{pad}.safetensors")
        residues.add(_header_length(path) % 256)
        assert load_update(path, lenet).local_steps == 2
    assert residues == set(range(0, 256, 8))


# ---------------------------------------------------------------- untrusted metadata and allocations
@pytest.mark.parametrize("change, needle", [
    ({"kwargs": {"hidden": "200000,200000"}}, "over the limit"),
    ({"input_shape": [3, 50000, 50000]}, "exceeds the limit of 4096"),
    ({"seed": 10**30}, "model.seed must be an integer in 0.."),
    ({"num_classes": -3}, "model.num_classes must be an integer"),
    ({"kwargs": {"hidden": list(range(100))}}, "not a small JSON value"),
    ({"extra_key": 1}, "unknown key 'extra_key'"),
])
def test_model_descriptions_are_bounded_before_anything_is_built(tmp_path, photos, change, needle):
    mlp = build_model("mlp", (3, 32, 32), 10, hidden=(8,))
    update = fedsgd_update(mlp, photos.images[:1], photos.labels[:1],
                           model_info=model_info("mlp", (3, 32, 32), 10, 0, hidden=(8,)))
    metadata = update.metadata()
    metadata["model"] = {**metadata["model"], **change}
    path = _signed(tmp_path / "u.safetensors", _flat_tensors(update), json.dumps(metadata))
    started = time.perf_counter()
    _refused(path, needle)
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["attack", str(path), "--out", str(out), "-q"])
    assert result.exit_code == 2 and needle in result.output and result.output.count("\n") == 1
    assert time.perf_counter() - started < 10
    assert not out.exists()


def test_a_factory_named_by_a_file_is_never_imported(tmp_path, photos, monkeypatch):
    """An update may record a user factory (pkg.mod:factory), but attacking the file never
    imports it: the user names the model. A module that would leave a marker on import is
    on sys.path; the marker never appears."""
    (tmp_path / "gl_evil_models.py").write_text(
        "import pathlib\npathlib.Path(__file__).with_name('IMPORTED').write_text('x')\n"
        "import torch\ndef make():\n    return torch.nn.Linear(3 * 32 * 32, 10)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    mlp = build_model("mlp", (3, 32, 32), 10, hidden=(8,))
    update = fedsgd_update(mlp, photos.images[:1], photos.labels[:1],
                           model_info=model_info("mlp", (3, 32, 32), 10, 0, hidden=(8,)))
    metadata = update.metadata()
    metadata["model"] = {**metadata["model"], "name": "gl_evil_models:make", "kwargs": {}}
    path = _signed(tmp_path / "u.safetensors", _flat_tensors(update), json.dumps(metadata))
    assert load_update(path).model["name"] == "gl_evil_models:make"  # a file may name it...
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["attack", str(path), "--out", str(out), "-q"])
    assert result.exit_code == 2 and "never imports code named by a file" in result.output
    assert "pass --model gl_evil_models:make" in result.output
    assert not (tmp_path / "IMPORTED").exists() and not out.exists()  # ...but it is never imported


def test_a_description_that_builds_other_parameters_is_refused(tmp_path, photos):
    mlp = build_model("mlp", (3, 32, 32), 10, hidden=(8,))
    update = fedsgd_update(mlp, photos.images[:1], photos.labels[:1],
                           model_info=model_info("mlp", (3, 32, 32), 10, 0, hidden=(9,)))
    path = save_update(update, tmp_path / "u.safetensors")
    _refused(path, "builds 'layers.fc1.weight' with shape (9, 3072)", "(8, 3072)")


# ---------------------------------------------------------------- exceptions that escaped
def test_deeply_nested_json_is_refused(tmp_path, update):
    metadata = json.dumps(update.metadata()).replace('"extra": {}', '"extra": {"x": ' + "[" * 5000 + "]" * 5000 + "}")
    tensors = _flat_tensors(update)
    path = tmp_path / "deep.safetensors"
    path.write_bytes(raw_save(tensors, metadata={"gradleak": metadata, "sha256": "0" * 64}))
    _refused(path, "metadata is not valid JSON", "nested too deeply")
    body = b'{"a":' + b"[" * 5000 + b"]" * 5000 + b"}"
    body += b" " * (-len(body) % 8)
    (tmp_path / "deep-header.safetensors").write_bytes(struct.pack("<Q", len(body)) + body)
    _refused(tmp_path / "deep-header.safetensors", "header is not valid JSON")


def test_integers_beyond_the_conversion_limit_are_refused(tmp_path, update):
    metadata = json.dumps(update.metadata()).replace('"batch_size": 1', '"batch_size": 1' + "0" * 5000)
    path = tmp_path / "u.safetensors"
    path.write_bytes(raw_save(_flat_tensors(update), metadata={"gradleak": metadata, "sha256": "0" * 64}))
    _refused(path, "not valid JSON")


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2, torch.complex64, torch.uint16])
def test_tensors_of_unsupported_dtypes_are_refused(tmp_path, update, dtype):
    tensors = _flat_tensors(update)
    tensors["update/fc.bias"] = tensors["update/fc.bias"].to(dtype)
    path = _signed(tmp_path / "u.safetensors", tensors, json.dumps(update.metadata()))
    _refused(path, "update['fc.bias']", f"dtype {dtype} is not a floating-point dtype")


@pytest.mark.parametrize("key, value, needle", [
    ("local_lr", "1" + "0" * 400, "local_lr must be a finite number > 0 or None"),
    ("local_lr", "1e999", "local_lr must be a finite number > 0 or None"),
    ("data_spec", '["a"]', "DataSpec: expected {'mean': [...], 'std': [...]}"),
    ("data_spec", '{"mean": ["a"], "std": [1]}', "DataSpec.mean[0]: expected a number"),
    ("data_spec", '{"mean": [1' + "0" * 400 + '], "std": [1]}', "DataSpec.mean[0]: must be finite"),
    ("data_spec", '{"mean": [1e999], "std": [1]}', "DataSpec.mean[0]: must be finite"),
    ("data_spec", '{"mean": [0], "std": [1e999]}', "DataSpec.std[0]: must be finite"),
    ("batch_size", "100000000", "batch_size must be an integer in 1..4096"),
    ("input_shape", "[3, 32, 32, 0]", "input_shape[3] must be an integer in 1.."),
])
def test_hostile_metadata_values_are_refused_naming_the_key(tmp_path, update, key, value, needle):
    metadata = update.metadata()
    text = json.dumps(metadata).replace(f'"{key}": {json.dumps(metadata[key])}', f'"{key}": {value}', 1)
    assert text != json.dumps(metadata)
    path = _signed(tmp_path / "u.safetensors", _flat_tensors(update), text)
    _refused(path, needle)


def test_an_overlong_path_component_is_one_line(tmp_path):
    _refused(tmp_path / ("n" * 300 + ".safetensors"), "cannot read update file", "File name too long")


def test_special_files_are_refused_without_blocking(tmp_path):
    import os

    os.mkfifo(tmp_path / "fifo.safetensors")
    (tmp_path / "zero.safetensors").symlink_to("/dev/zero")
    for name in ("fifo.safetensors", "zero.safetensors"):
        _refused(tmp_path / name, "not a regular file")


# ---------------------------------------------------------------- partial updates
def test_an_update_missing_a_parameter_tensor_is_refused(tmp_path, lenet, update):
    tensors = _flat_tensors(update)
    del tensors["update/fc.bias"]
    path = _signed(tmp_path / "u.safetensors", tensors, json.dumps(update.metadata()))
    _refused(path, "no tensor for parameter 'fc.bias'", "1 of 8 parameters missing", model=lenet)
    with pytest.raises(UpdateFileError, match="no tensor for parameter 'fc.bias'"):
        SharedUpdate({k: v for k, v in update.tensors.items() if k != "fc.bias"}, parameters=update.parameters)


# ---------------------------------------------------------------- loss and model mismatches, found up front
def test_a_loss_the_model_does_not_train_with_is_refused(tmp_path, update):
    metadata = update.metadata() | {"loss": "binary_cross_entropy"}
    path = _signed(tmp_path / "u.safetensors", _flat_tensors(update), json.dumps(metadata))
    _refused(path, "the update says loss 'binary_cross_entropy', but model 'lenet' trains with 'cross_entropy'")


def test_labels_outside_the_model_classes_are_refused(tmp_path, update):
    tensors = _flat_tensors(update)
    tensors["labels"] = torch.tensor([12])
    path = _signed(tmp_path / "u.safetensors", tensors, json.dumps(update.metadata()))
    _refused(path, "label 12 is out of range for 10 classes")


@pytest.mark.parametrize("args, needle", [
    (["--model", "convnet", "-m", "width=-1"], "model 'convnet': bad option {'width': -1}"),
    (["--model", "resnet20", "-m", "width=0"], "a width of zero"),
    (["--model", "mlp", "-m", "hidden=200000,200000"], "over the limit"),
    (["--attack", "inverting-gradients", "--model", "lenet", "-o", "restarts=100000"],
     "restarts must be an integer in 1..256"),
    (["--attack", "inverting-gradients", "--model", "lenet", "-o", "iterations=1e400"],
     "iterations must be an integer"),
    (["--attack", "dlg", "--model", "lenet", "-o", "seed=-1"], "seed must be an integer in 0.."),
    (["--seed", str(10**30)], "seed must be an integer in 0.."),
])
def test_bad_model_and_attack_options_are_one_line_before_any_work(tmp_path, args, needle):
    out = tmp_path / "run"
    started = time.perf_counter()
    result = CliRunner().invoke(app, ["attack", "--n", "1", "--out", str(out), "-q", *args])
    assert result.exit_code == 2, result.output
    assert needle in result.output and result.output.count("\n") == 1, result.output
    assert time.perf_counter() - started < 10
    assert not out.exists()


def test_the_zoo_refuses_a_description_without_allocating(tmp_path):
    with pytest.raises(ConfigError, match="over the limit"):
        model_from_info({"name": "mlp", "input_shape": [3, 32, 32], "num_classes": 10,
                         "kwargs": {"hidden": "200000,200000"}})
