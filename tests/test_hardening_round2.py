"""Hardening, round two: each defect a hostile-input review found in the doors added since the
first round (audit configs naming code, weights files, model factories, `train`, update
metadata, Ray addresses), as a regression test; and the systemic guards that close them
(names normalised in one place, one table of limits, the CLI's last-line guard, staged run
folders, containers bounded by their declarations)."""

from __future__ import annotations

import io
import json
import resource
import socket
import struct
import threading
import time
import zipfile

import pytest
import torch
from safetensors.torch import load as raw_load
from safetensors.torch import save as raw_save
from safetensors.torch import save_file
from typer.testing import CliRunner

from gradleak.audit import load_audit_config
from gradleak.cli import app
from gradleak.errors import ConfigError, UpdateFileError
from gradleak.limits import LIMITS
from gradleak.models import ModelSpec, build_model
from gradleak.models.weights import read_weights
from gradleak.names import check_import_allowed, model_name
from gradleak.update_file import load_update
from gradleak.update_file import _digest

runner = CliRunner()

MARKER_MODULE = '''
import pathlib, os
pathlib.Path(os.environ["GRADLEAK_TEST_MARKER"]).write_text("imported")

def factory(**options):
    pathlib.Path(os.environ["GRADLEAK_TEST_MARKER"]).write_text("called")
    import torch
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 10))
'''

FACTORIES = '''
import sys
import torch

def meta(**options):
    with torch.device("meta"):
        return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 10))

def generator_exit(**options):
    raise GeneratorExit

def exits(**options):
    sys.exit(0)

class NoOutputs(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(3 * 8 * 8, 4)
    def forward(self, x):
        return self.fc(x.flatten(1))[:, :0]

def zero_outputs(**options):
    return NoOutputs()

class FirstOnly(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(3 * 8 * 8, 10)
    def forward(self, x):
        return self.fc(x.flatten(1))[:1]

def wrong_batch(**options):
    return FirstOnly()

def chatty(**options):
    print("building my model, hello!")
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 10))
'''


@pytest.fixture()
def user_code(tmp_path, monkeypatch):
    (tmp_path / "hostile_factories.py").write_text(FACTORIES)
    (tmp_path / "exits_on_import.py").write_text("import sys\nsys.exit(0)\n")
    (tmp_path / "marker_module.py").write_text(MARKER_MODULE)
    monkeypatch.setenv("GRADLEAK_TEST_MARKER", str(tmp_path / "marker.txt"))
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def _one_line_error(result, code: int = 2) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == code and len(lines) == 1 and lines[0].startswith("error: "), \
        (result.exit_code, result.stderr)
    return lines[0]


# ---------------------------------------------------------------- 1. --allow-import bypassed
NAMES = [" marker_module:factory", "\tmarker_module:factory", "marker_module:factory\n", "marker_module:factory ",
         "\u3000marker_module:factory", "ｍａｒｋｅｒ_ｍｏｄｕｌｅ：ｆａｃｔｏｒｙ"]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("form", ["plain", "mapping"])
@pytest.mark.parametrize("suffix", [".yaml", ".toml"])
def test_a_config_cannot_import_code_by_dressing_up_its_name(user_code, name, form, suffix):
    """Whitespace, full-width look-alikes, a trailing newline: the name is normalised before the
    --allow-import check, so each is the factory it spells and is refused; nothing is imported."""
    tmp = user_code
    entry = {"name": name} if form == "mapping" else name
    if suffix == ".yaml":
        text = json.dumps({"models": [entry], "attacks": ["fc-bias"], "data": {"name": "photos", "n": 1, "size": 8}})
    else:
        model = f"{{name = {json.dumps(name)}}}" if form == "mapping" else json.dumps(name)
        text = f'models = [{model}]\nattacks = ["fc-bias"]\ndata = {{name = "photos", n = 1, size = 8}}\n'
    config = tmp / f"audit{suffix}"
    config.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError, match="--allow-import marker_module") as info:
        load_audit_config(config)
    assert "\n" not in str(info.value)
    result = runner.invoke(app, ["audit", str(config), "--out", str(tmp / "out"), "-q"])
    assert "--allow-import marker_module" in _one_line_error(result)
    assert not (tmp / "marker.txt").exists() and not (tmp / "out").exists()


def test_an_allowed_factory_is_the_normalised_one(user_code):
    config = load_audit_config(_write(user_code / "a.yaml", [" marker_module:factory"]),
                               allow_imports=("marker_module",))
    assert config.models[0].name == "marker_module:factory"


def _write(path, models):
    path.write_text(json.dumps({"models": models, "attacks": ["fc-bias"], "data": {"name": "photos", "n": 1,
                                                                                   "size": 8}}))
    return path


@pytest.mark.parametrize("name, needle", [
    ("\u043es:getcwd", "U+043E (CYRILLIC SMALL LETTER O)"),   # a Cyrillic o that looks like the Latin one
    ("os:get\u200bcwd", "U+200B"),                            # a zero-width space inside
    ("os::getcwd", "unknown model 'os::getcwd'"),
    ("os:getcwd:x", "unknown model"),
    ("../evil:f", "unknown model"),
    ("os:", "unknown model"),
    ("", "the name is empty"),
    ("x" * 201 + ":f", "longer than the limit of 200"),
])
def test_names_that_are_not_names_are_refused_before_anything(name, needle):
    with pytest.raises(ConfigError) as info:
        model_name(name, "models[0]")
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_the_import_check_sees_what_would_be_imported():
    check_import_allowed(" lenet", (), "m")                       # a zoo name: nothing to allow
    check_import_allowed("pkg.sub:make", ("pkg",), "m")          # a package above it
    for hostile in (" os:getcwd", "os:getcwd\n", "ｏｓ：ｇｅｔｃｗｄ"):
        with pytest.raises(ConfigError, match="--allow-import os"):
            check_import_allowed(hostile, ("pkg",), "m")
    assert ModelSpec(" lenet ").name == "lenet"


# ---------------------------------------------------------------- 2-4. weights files
@pytest.fixture(scope="module")
def mlp_state():
    model = build_model("mlp", (3, 8, 8), 10)
    return {k: v.clone().contiguous() for k, v in model.state_dict().items()}


def _analyze(weights, *extra):
    return runner.invoke(app, ["analyze", "--model", "mlp", "--input-shape", "3x8x8", "--weights", str(weights),
                               *extra])


def test_float8_weights_are_refused_in_one_line(tmp_path, mlp_state):
    path = tmp_path / "f8.safetensors"
    save_file({k: v.to(torch.float8_e4m3fn) for k, v in mlp_state.items()}, path)
    assert "dtype 'F8_E4M3'" in _one_line_error(_analyze(path))
    for command in (["attack", "--n", "1", "--size", "8", "--model", "mlp"],
                    ["capture", "--out", str(tmp_path / "u.safetensors"), "--size", "8"],
                    ["train", "--n", "20", "--size", "8", "--epochs", "1", "--out", str(tmp_path / "t")]):
        result = runner.invoke(app, [*command, "--weights", str(path), "--device", "cpu", "-q"])
        assert "dtype 'F8_E4M3'" in _one_line_error(result), command
    assert not (tmp_path / "t").exists() and not (tmp_path / "u.safetensors").exists()


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support")
@pytest.mark.parametrize("layout", ["coo", "csr"])
def test_sparse_weights_are_refused_in_one_line(tmp_path, mlp_state, layout):
    state = dict(mlp_state)
    weight = state["layers.fc1.weight"]
    state["layers.fc1.weight"] = weight.to_sparse() if layout == "coo" else weight.to_sparse_csr()
    path = tmp_path / "sparse.pt"
    torch.save(state, path)
    assert f"is a sparse_{layout} tensor" in _one_line_error(_analyze(path))


def test_a_compressed_archive_is_refused_before_it_is_inflated(tmp_path):
    """A 256 MiB storage of zeros, DEFLATE-compressed into a file of about 260 KB: refused from the
    zip's central directory, with the memory of this process barely moving."""
    buffer = io.BytesIO()
    torch.save({"w": torch.zeros(64 * 2**20)}, buffer)
    original = zipfile.ZipFile(io.BytesIO(buffer.getvalue()))
    path = tmp_path / "bomb.pt"
    with zipfile.ZipFile(path, "w") as bomb:
        for info in original.infolist():
            bomb.writestr(info.filename, original.read(info.filename), compress_type=zipfile.ZIP_DEFLATED)
    del buffer, original
    assert path.stat().st_size < 2**20
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(ConfigError, match="is compressed .*refused before inflating") as info:
        read_weights(path)
    assert "\n" not in str(info.value)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 64 * 1024  # KB: well under the 256 MiB


def test_an_archive_that_claims_more_than_it_holds_is_refused(tmp_path, mlp_state):
    buffer = io.BytesIO()
    torch.save(mlp_state, buffer)
    data = bytearray(buffer.getvalue())
    # the central directory's uncompressed size of the first entry: claim 1 GiB
    central = data.rindex(b"PK\x01\x02", 0, len(data) - 22)
    first = data.index(b"PK\x01\x02")
    data[first + 24 : first + 28] = struct.pack("<I", 2**30)
    path = tmp_path / "claims.pt"
    path.write_bytes(bytes(data))
    assert central >= first
    with pytest.raises(ConfigError) as info:
        read_weights(path)
    assert "\n" not in str(info.value)


def test_weights_that_overflow_the_models_dtype_are_refused(tmp_path, mlp_state):
    state = {k: v.double() for k, v in mlp_state.items()}
    state["layers.fc1.weight"][0, 0] = 1e300
    path = tmp_path / "big.safetensors"
    save_file(state, path)
    assert "infinite values after the cast to torch.float32" in _one_line_error(_analyze(path))
    assert _analyze(path, "--dtype", "float64").exit_code == 0  # finite in float64: fine there


def test_a_header_of_many_empty_tensors_is_refused_quickly(tmp_path):
    """600,000 empty tensors in a 38 MB header: refused by counting, before the JSON is parsed."""
    header = {f"t{k}": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]} for k in range(600_000)}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    path = tmp_path / "many.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw)
    del header, raw
    start = time.perf_counter()
    with pytest.raises(ConfigError, match="more than 100,000 tensors"):
        read_weights(path)
    assert time.perf_counter() - start < 5  # a bound, not a benchmark: it took 9.7 s and 1.1 GB before


# ---------------------------------------------------------------- 5. train --size and the shared limits
@pytest.mark.parametrize("args", [["--size", "100000"], ["--size", "1"], ["--n", "1000000"], ["--epochs", "0"],
                                  ["--clients", "0"], ["--batch-size", "0"]])
def test_train_options_share_the_limits_of_every_command(tmp_path, args):
    result = runner.invoke(app, ["train", "--data", "digits", "--out", str(tmp_path / "t"), *args])
    assert result.exit_code == 2 and "is not in the range" in _one_line_error(result)
    assert not (tmp_path / "t").exists()


def test_the_same_limit_bounds_the_same_quantity_everywhere():
    side = LIMITS["side"]
    for command in ("attack", "capture", "demo", "train"):
        result = runner.invoke(app, [command, "--size", str(side.high + 1), "--out", "unused"])
        assert f"{side.low}<=x<={side.high}" in result.stderr, command
    from gradleak.audit._checks import MAX_SIDE
    from gradleak.data.request import DataRequest

    assert MAX_SIDE == side.high
    with pytest.raises(ConfigError, match=f"{side.low}..{side.high}"):
        DataRequest("photos", 1, side.high + 1)


def test_images_are_bounded_by_their_pixels_before_resizing():
    from gradleak.data import load_builtin
    from gradleak.errors import DataError

    digits = load_builtin("digits", n=64)
    with pytest.raises(DataError, match="over the limit"):
        digits.resize(4096)          # 64 x 1 x 4096^2 = 1.07e9 values
    with pytest.raises(DataError, match="1..4096"):
        load_builtin("digits", size=100_000)


# ---------------------------------------------------------------- 6. deep metadata, half-written folders
def _resigned(source, destination, **changes):
    data = source.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    metadata = json.loads(json.loads(data[8 : 8 + length])["__metadata__"]["gradleak"])
    metadata.update(changes)
    tensors = raw_load(data)
    text = json.dumps(metadata)
    destination.write_bytes(raw_save(tensors, metadata={"gradleak": text,
                                                        "sha256": _digest(json.loads(text), tensors)}))
    return destination


@pytest.fixture()
def update_file(tmp_path):
    path = tmp_path / "u.safetensors"
    result = runner.invoke(app, ["capture", "--out", str(path), "--size", "8", "--device", "cpu", "-q"])
    assert result.exit_code == 0, result.output
    return path


def test_deeply_nested_metadata_is_one_line_and_writes_no_folder(tmp_path, update_file):
    deep: list = []
    for _ in range(900):
        deep = [deep]
    hostile = _resigned(update_file, tmp_path / "deep.safetensors", extra={"x": deep})
    with pytest.raises(UpdateFileError, match="extra: nested more than 32 levels deep"):
        load_update(hostile)
    out = tmp_path / "run"
    result = runner.invoke(app, ["attack", str(hostile), "--out", str(out), "-q"])
    assert "nested more than 32 levels deep" in _one_line_error(result)
    assert not out.exists() and not [p for p in tmp_path.iterdir() if ".partial-" in p.name]


def test_a_failure_midway_leaves_no_half_folder(tmp_path, update_file, monkeypatch):
    """The run folder is staged: a failure after some files are written leaves nothing behind;
    with --overwrite, the run it was to replace is back in place after the failure."""
    import gradleak.runs as runs

    def broken(*args, **kwargs):
        raise RuntimeError("the disk caught fire")

    out = tmp_path / "run"
    with monkeypatch.context() as patch:
        patch.setattr(runs, "write_html_report", broken)
        result = runner.invoke(app, ["attack", str(update_file), "--out", str(out), "-q"])
        assert "RuntimeError: the disk caught fire" in _one_line_error(result, code=70)
        assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert runner.invoke(app, ["attack", str(update_file), "--out", str(out), "-q"]).exit_code == 0
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    with monkeypatch.context() as patch:
        patch.setattr(runs, "write_html_report", broken)
        result = runner.invoke(app, ["attack", str(update_file), "--out", str(out), "--overwrite", "-q"])
        assert result.exit_code == 70
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before   # the old run, untouched
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_no_run_replaces_another_unless_asked(tmp_path, update_file):
    """Without --out every run gets a new folder; an --out that holds results is refused unless
    --overwrite, and --overwrite replaces only a gradleak result, never a folder of the user's files."""
    import os

    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        first = runner.invoke(app, ["attack", str(update_file), "-q"])
        second = runner.invoke(app, ["attack", str(update_file), "-q"])
    finally:
        os.chdir(cwd)
    assert first.exit_code == second.exit_code == 0
    folders = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert len(folders) == 2 and all(name.startswith("attack-") for name in folders)
    out = tmp_path / "runs" / folders[0]
    (out / "stale.txt").write_text("from an older run")
    refused = runner.invoke(app, ["attack", str(update_file), "--out", str(out), "-q"])
    assert "already holds results; pass --overwrite" in _one_line_error(refused)
    assert runner.invoke(app, ["attack", str(update_file), "--out", str(out), "--overwrite", "-q"]).exit_code == 0
    assert not (out / "stale.txt").exists() and (out / "report.html").is_file()   # replaced, not merged
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    refused = runner.invoke(app, ["attack", str(update_file), "--out", str(mine), "--overwrite", "-q"])
    assert "no gradleak results" in _one_line_error(refused) and (mine / "notes.txt").read_text() == "mine"
    capture = runner.invoke(app, ["capture", "--out", str(update_file), "--size", "8", "-q"])
    assert "already exists; pass --overwrite" in _one_line_error(capture)


# ---------------------------------------------------------------- 7. factories: the top-level guard
@pytest.mark.parametrize("spec, needle", [
    ("hostile_factories:meta", "on the meta device"),
    ("hostile_factories:generator_exit", "the factory raised GeneratorExit"),
    ("hostile_factories:exits", "the factory called sys.exit(0)"),
    ("exits_on_import:f", "cannot import 'exits_on_import' (called sys.exit(0))"),
    ("hostile_factories:zero_outputs", "must return class scores of shape (2, K) with K >= 1, got torch.float32 "
                                       "of shape (2, 0)"),
    ("hostile_factories:wrong_batch", "got torch.float32 of shape (1, 10)"),
])
def test_factories_that_misbehave_are_one_line(user_code, spec, needle):
    for command in (["analyze", "--input-shape", "3x8x8"],
                    ["attack", "--n", "1", "--size", "8", "--device", "cpu", "--out", str(user_code / "run"), "-q"]):
        result = runner.invoke(app, [*command, "--model", spec])
        assert needle in _one_line_error(result), (command, result.stderr)
    assert not (user_code / "run").exists()


def test_a_factorys_print_never_reaches_machine_readable_output(user_code):
    result = runner.invoke(app, ["analyze", "--model", "hostile_factories:chatty", "--input-shape", "3x8x8",
                                 "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)          # stdout is the JSON and nothing else
    assert report["model"] == "hostile_factories:chatty"
    assert "building my model, hello!" in result.stderr


def test_the_guard_turns_anything_unexpected_into_one_line(monkeypatch, tmp_path):
    import gradleak.pipeline as pipeline

    def boom(*args, **kwargs):
        raise SystemExit(3)

    monkeypatch.setattr(pipeline, "attack_simulated", boom)
    result = runner.invoke(app, ["attack", "--n", "1", "--size", "8", "--out", str(tmp_path / "r"), "-q"])
    line = _one_line_error(result, code=70)
    assert "something called sys.exit(3)" in line and "--verbose shows the traceback" in line
    verbose = runner.invoke(app, ["attack", "--n", "1", "--size", "8", "--out", str(tmp_path / "r"), "-q",
                                  "--verbose"])
    assert verbose.exit_code == 70 and "Traceback (most recent call last)" in verbose.stderr


# ---------------------------------------------------------------- 8. Ray addresses
def _serve(reply: bytes | None):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()

    def answer():
        connection, _ = server.accept()
        if reply is not None:
            connection.recv(64)
            connection.sendall(reply)
        time.sleep(0.5 if reply is not None else 4)
        connection.close()
        server.close()

    threading.Thread(target=answer, daemon=True).start()
    return f"127.0.0.1:{server.getsockname()[1]}"


@pytest.mark.parametrize("reply, needle", [
    (b"HTTP/1.0 400 Bad Request\r\n\r\n", "answered in HTTP/1"),
    (None, "sent nothing back within 3 s"),
])
def test_an_address_that_is_not_a_ray_head_is_refused_quickly(tmp_path, reply, needle):
    pytest.importorskip("ray")
    config = _write(tmp_path / "a.yaml", ["mlp"])
    start = time.perf_counter()
    result = runner.invoke(app, ["audit", str(config), "--out", str(tmp_path / "o"), "--ray-address",
                                 _serve(reply), "-q"])
    assert needle in _one_line_error(result) and "not a Ray head" in result.stderr
    assert time.perf_counter() - start < 20


def test_an_http2_server_passes_the_probe():
    """What a gRPC server (Ray's GCS) sends first: a SETTINGS frame."""
    from gradleak.audit._ray import _http2_answer

    address = _serve(b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")
    host, _, port = address.rpartition(":")
    with socket.create_connection((host, int(port)), timeout=5) as connection:
        assert _http2_answer(connection) is True


def test_an_empty_ray_address_is_refused_not_run_locally(tmp_path):
    pytest.importorskip("ray")
    config = _write(tmp_path / "a.yaml", ["mlp"])
    result = runner.invoke(app, ["audit", str(config), "--out", str(tmp_path / "o"), "--ray-address", "", "-q"])
    assert "expected 'auto' or the HOST:PORT" in _one_line_error(result)
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------- smaller ones
def test_an_image_too_small_for_the_model_says_so(tmp_path):
    result = runner.invoke(app, ["attack", "--model", "convnet", "--size", "8", "--n", "1", "--attack",
                                 "inverting-gradients", "--out", str(tmp_path / "r"), "-q"])
    line = _one_line_error(result)
    assert "an input of 8x8 px is too small for it" in line and "width of zero" not in line


def test_an_archive_of_an_unknown_zip_version_is_one_line(tmp_path, mlp_state):
    """Found by the long fuzz run: zipfile raises NotImplementedError for 'zip file version 12.1'."""
    buffer = io.BytesIO()
    torch.save(mlp_state, buffer)
    data = bytearray(buffer.getvalue())
    at = data.find(b"PK\x01\x02")
    data[at + 6] = 121
    path = tmp_path / "version.pt"
    path.write_bytes(bytes(data))
    assert "zip file version 12.1" in _one_line_error(_analyze(path))
