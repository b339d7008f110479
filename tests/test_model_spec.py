"""One way to name a model (ModelSpec): the user's own model and weights, the device, the mode,
and the files an update records about them."""

from __future__ import annotations

import json
import os
import pickle

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from gradleak import fedsgd_update
from gradleak.attacks import get_attack
from gradleak.cli import app
from gradleak.errors import ConfigError
from gradleak.models import ModelSpec, read_weights, resolve_device
from gradleak.threat import ThreatModel

USER_MODULE = '''
import torch
from torch import nn


def small_cnn(width=4, classes=10):
    """A user's own network: conv, BatchNorm, ReLU, then a fully connected head."""
    return nn.Sequential(nn.Conv2d(3, int(width), 3, padding=1), nn.BatchNorm2d(int(width)), nn.ReLU(),
                         nn.Flatten(), nn.Linear(int(width) * 16 * 16, int(classes)))


def other_cnn(width=4, classes=10):
    return nn.Sequential(nn.Conv2d(3, int(width), 5, padding=2), nn.ReLU(), nn.Flatten(),
                         nn.Linear(int(width) * 16 * 16, int(classes)))
'''


@pytest.fixture()
def user_module(tmp_path, monkeypatch):
    (tmp_path / "my_nets.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "my_nets"


def _trained_like(spec: ModelSpec, shape=(3, 16, 16)):
    """A model whose weights differ from the seed's initialisation (as a trained one would)."""
    built = spec.build(shape, 10)
    with torch.no_grad():
        for p in built.module.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
        for name, b in built.module.named_buffers():
            if name.endswith("running_mean"):
                b.add_(0.5)
    return built.module


def _outputs(module, photos, shape=16):
    from gradleak.data import load_builtin

    x = load_builtin("photos", size=shape, n=2).images
    module.eval()
    with torch.no_grad():
        return module(x)


# ---------------------------------------------------------------- weights files
def test_safetensors_weights_round_trip_and_are_recorded(tmp_path, photos):
    module = _trained_like(ModelSpec("convnet", {"width": 8}))
    save_file(module.state_dict(), tmp_path / "w.safetensors")
    built = ModelSpec("convnet", {"width": 8}, weights=tmp_path / "w.safetensors").build((3, 16, 16), 10)
    assert torch.equal(_outputs(built.module, photos), _outputs(module, photos))
    assert built.description()["weights_sha256"] == read_weights(tmp_path / "w.safetensors").sha256


@pytest.mark.parametrize("wrap", ["plain", "state_dict", "data_parallel"])
def test_pytorch_state_dicts_load_with_weights_only(tmp_path, photos, wrap):
    module = _trained_like(ModelSpec("lenet"))
    state = module.state_dict()
    if wrap == "state_dict":
        state = {"state_dict": state, "epoch": 3}
    elif wrap == "data_parallel":
        state = {f"module.{k}": v for k, v in state.items()}
    torch.save(state, tmp_path / "w.pth")
    built = ModelSpec("lenet", weights=str(tmp_path / "w.pth")).build((3, 16, 16), 10)
    assert torch.equal(_outputs(built.module, photos), _outputs(module, photos))


def test_torchvision_weight_files_load_into_the_tv_models(tmp_path, photos):
    """torchvision's own files (resnet18-f37072fd.pth) are plain state dicts of the 1000-class model."""
    import torchvision

    reference = torchvision.models.resnet18(weights=None)
    torch.save(reference.state_dict(), tmp_path / "resnet18-f37072fd.pth")
    built = ModelSpec("tv-resnet18", weights=tmp_path / "resnet18-f37072fd.pth", num_classes=1000).build((3, 64, 64))
    assert torch.equal(_outputs(built.module, photos, 64), _outputs(reference, photos, 64))
    with pytest.raises(ConfigError, match=r"'fc.weight' has shape \(1000, 512\) but the model's is \(10, 512\)"):
        ModelSpec("tv-resnet18", weights=tmp_path / "resnet18-f37072fd.pth").build((3, 64, 64), 10)


@pytest.mark.parametrize("case, needle", [
    ("other architecture", "do not fit LeNet: missing 'body.0.weight'"),
    ("mis-shaped", "'fc.weight' has shape"),
    ("nan", "'fc.bias' holds NaN"),
    ("object pickle", "weights_only=True"),
    ("not a state dict", "not a state dict"),
    ("garbage", "not a safetensors file or a PyTorch state dict"),
])
def test_bad_weights_files_are_one_line(tmp_path, case, needle):
    lenet = ModelSpec("lenet").build((3, 16, 16), 10).module
    path = tmp_path / "w.pt"
    if case == "other architecture":
        torch.save(ModelSpec("mlp").build((3, 16, 16), 10).module.state_dict(), path)
    elif case == "mis-shaped":
        torch.save(ModelSpec("lenet").build((3, 16, 16), 7).module.state_dict(), path)
    elif case == "nan":
        state = lenet.state_dict()
        state["fc.bias"][0] = float("nan")
        torch.save(state, path)
    elif case == "object pickle":
        class Payload:
            def __reduce__(self):
                return (os.system, (f"touch {tmp_path / 'RAN'}",))

        path.write_bytes(pickle.dumps({"fc.weight": Payload()}))
    elif case == "not a state dict":
        torch.save([torch.zeros(2)], path)
    else:
        path.write_bytes(b"\x00" * 100)
    with pytest.raises(ConfigError) as info:
        ModelSpec("lenet", weights=path).build((3, 16, 16), 10)
    assert needle in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "RAN").exists()


# ---------------------------------------------------------------- devices
def test_auto_takes_what_the_machine_has_and_missing_devices_are_one_line():
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else resolve_device("auto").type)
    assert resolve_device("cpu") == torch.device("cpu")
    for device, needle in (("tpu", "device must be auto, cpu, cuda"), ("cuda:x", "device must be")):
        with pytest.raises(ConfigError, match=needle):
            resolve_device(device)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available on this machine"):
            resolve_device("cuda")
        result = CliRunner().invoke(app, ["attack", "--n", "1", "--device", "cuda", "--out", "unused", "-q"])
        assert result.exit_code == 2 and "CUDA is not available" in result.output and result.output.count("\n") == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cpu_and_cuda_agree(tmp_path):  # pragma: no cover - run where a GPU is lent
    from gradleak.pipeline import DataRequest, attack_simulated

    runs = {d: attack_simulated("inverting-gradients", tmp_path / d, data=DataRequest("photos", 2),
                                model=ModelSpec("lenet", device=d), options={"iterations": 50}, quiet=True)
            for d in ("cpu", "cuda")}
    cpu, gpu = (runs[d].scores.summary["psnr_mean"] for d in ("cpu", "cuda"))
    assert abs(cpu - gpu) < 0.5


# ---------------------------------------------------------------- modes
def test_updates_record_the_mode_and_attacks_run_in_it(photos):
    built = ModelSpec("convnet", {"width": 4}, mode="eval").build((3, 32, 32), 10)
    before = {n: b.clone() for n, b in built.module.named_buffers()}
    update = fedsgd_update(built.module, photos.images[:1], photos.labels[:1])
    assert update.mode == "eval"
    assert all(torch.equal(before[n], b) for n, b in update.buffers.items())  # eval mode leaves the statistics alone
    assert fedsgd_update(built.module.train(), photos.images[:1], photos.labels[:1]).mode == "train"

    attack = get_attack("inverting-gradients")(built.module.train(), ThreatModel(), iterations=1)
    seen = []
    original = attack._reconstruct

    def spy(observed):
        seen.append(attack.model.training)
        return original(observed)

    attack._reconstruct = spy
    attack.reconstruct(update)
    assert seen == [False] and attack.model.training  # ran in eval as the client did; left in train


# ---------------------------------------------------------------- the user's own model, end to end
def test_a_user_model_and_weights_capture_attack_report(tmp_path, user_module):
    spec = ModelSpec(f"{user_module}:small_cnn", {"width": 4})
    save_file(_trained_like(spec).state_dict(), tmp_path / "w.safetensors")
    runner = CliRunner()
    model_args = ["--model", f"{user_module}:small_cnn", "-m", "width=4", "--weights", str(tmp_path / "w.safetensors")]
    update, truth = tmp_path / "u.safetensors", tmp_path / "t.safetensors"
    result = runner.invoke(app, ["capture", "--size", "16", "--out", str(update), "--truth", str(truth), "-q",
                                 "--mode", "eval", *model_args])
    assert result.exit_code == 0, result.output
    recorded = json.loads(json.loads(update.read_bytes()[8:8 + int.from_bytes(update.read_bytes()[:8], "little")]
                                     )["__metadata__"]["gradleak"])
    assert recorded["mode"] == "eval" and recorded["model"]["name"] == "my_nets:small_cnn"
    assert recorded["model"]["weights_sha256"] == read_weights(tmp_path / "w.safetensors").sha256

    out = tmp_path / "run"
    result = runner.invoke(app, ["attack", str(update), "--truth", str(truth), "--attack", "inverting-gradients",
                                 "-o", "iterations=30", "--out", str(out), "-q", *model_args])
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["summary"]["n_images"] == 1 and metrics["summary"]["psnr_mean"] > 5
    assert json.loads((out / "config.json").read_text())["update"]["mode"] == "eval"
    (out / "report.html").unlink()
    assert runner.invoke(app, ["report", str(out)]).exit_code == 0 and (out / "report.html").is_file()

    for args, needle in (
        ([], "never imports code named by a file"),
        (["--model", f"{user_module}:other_cnn", "-m", "width=4"], "the update was made with model name"),
        (["--model", f"{user_module}:small_cnn", "-m", "width=4", "--weights", str(_other_weights(tmp_path, spec))],
         "the update was made from weights with SHA-256"),
    ):
        bad = runner.invoke(app, ["attack", str(update), "--out", str(tmp_path / "bad"), "-q", *args])
        assert bad.exit_code == 2 and needle in bad.output and bad.output.count("\n") == 1, bad.output
        assert not (tmp_path / "bad").exists()


def _other_weights(tmp_path, spec):
    state = spec.build((3, 16, 16), 10).module.state_dict()
    save_file(state, tmp_path / "other.safetensors")
    return tmp_path / "other.safetensors"


# ---------------------------------------------------------------- audit configs
AUDIT = """
name: own weights
data: {name: photos, n: 2, size: 16}
models:
  - {name: MODEL, options: {width: 4}, weights: w.safetensors, mode: eval}
attacks: [{name: inverting-gradients, options: {iterations: 5}}]
utility: false
"""


def test_audit_configs_name_weights_and_modes_and_factories_only_when_allowed(tmp_path, user_module):
    from gradleak.audit import load_audit_config, run_audit

    save_file(_trained_like(ModelSpec(f"{user_module}:small_cnn", {"width": 4})).state_dict(),
              tmp_path / "w.safetensors")
    config = tmp_path / "audit.yaml"
    config.write_text(AUDIT.replace("MODEL", f"{user_module}:small_cnn"))
    with pytest.raises(ConfigError, match=f"would import code named by the config file.*--allow-import {user_module}"):
        load_audit_config(config)
    loaded = load_audit_config(config, allow_imports=(user_module,))
    assert loaded.models[0].weights == str(tmp_path / "w.safetensors") and loaded.models[0].mode == "eval"
    result = run_audit(loaded, tmp_path / "out", quiet=True)
    assert result.cells[0].status == "done", result.cells[0].message
    stored = json.loads((tmp_path / "out" / "cells" / result.cells[0].cell_id / "config.json").read_text())
    assert stored["cell"]["model"]["mode"] == "eval" and len(stored["cell"]["model"]["weights_sha256"]) == 64
    cli = CliRunner().invoke(app, ["audit", str(config), "--out", str(tmp_path / "cli"), "-q"])
    assert cli.exit_code == 2 and "--allow-import my_nets" in cli.output


def test_trained_weights_bring_their_input_normalization(tmp_path):
    """A network trained on normalised inputs expects the same normalisation when attacked: the
    weights file records it and clients use it instead of the attacked batch's own statistics."""
    from safetensors.torch import save

    from gradleak import DataSpec
    from gradleak.models.weights import weights_metadata
    from gradleak.pipeline import DataRequest, attack_simulated

    trained_spec = DataSpec((0.25, 0.5, 0.75), (0.2, 0.3, 0.4))
    module = _trained_like(ModelSpec("lenet"), (3, 32, 32))
    (tmp_path / "w.safetensors").write_bytes(save(module.state_dict(), metadata=weights_metadata(trained_spec)))
    built = ModelSpec("lenet", weights=tmp_path / "w.safetensors").build((3, 32, 32), 10)
    assert built.data_spec == trained_spec
    run = attack_simulated("fc-bias", tmp_path / "run", data=DataRequest("photos", 1),
                           model=ModelSpec("lenet", weights=tmp_path / "w.safetensors"), quiet=True)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["data_spec"] == trained_spec.to_json()
    assert run.reconstruction is not None


TRAINED_AUDIT = """
name: trained first
data: {name: faces, n: 2, size: 16}
models:
  - {name: convnet, options: {width: 4}, mode: eval, train: {epochs: 2, lr: 0.05, batch_size: 16}}
attacks: [{name: inverting-gradients, options: {iterations: 5}}]
utility: false
"""


def test_audit_models_can_be_trained_first_and_the_training_is_stored(tmp_path, monkeypatch):
    import gradleak.training as training
    from gradleak.audit import load_audit_config, run_audit

    config = tmp_path / "audit.yaml"
    config.write_text(TRAINED_AUDIT)
    calls = []
    original = training.train_model

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(training, "train_model", counting)
    first = run_audit(load_audit_config(config), tmp_path / "out", quiet=True)
    assert first.cells[0].status == "done", first.cells[0].message
    (folder,) = (tmp_path / "out" / "models").iterdir()
    assert (folder / "weights.safetensors").is_file() and (folder / "training.json").is_file()
    stored = json.loads((tmp_path / "out" / "cells" / first.cells[0].cell_id / "config.json").read_text())
    assert stored["cell"]["model"]["train"]["epochs"] == 2
    again = run_audit(load_audit_config(config), tmp_path / "out", quiet=True)
    assert calls == [1] and again.cells[0].psnr == first.cells[0].psnr  # neither retrained nor recomputed
    config.write_text(TRAINED_AUDIT.replace("epochs: 2", "epochs: 0"))
    with pytest.raises(ConfigError, match=r"models\[0\].train: epochs"):
        load_audit_config(config)
