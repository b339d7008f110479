"""``gradleak train`` and :func:`gradleak.training.train_model` on real images (built-in digits
and faces): centralised and federated training, the weights and training.json it writes,
checkpoints, BatchNorm statistics under federated averaging, determinism, Ctrl-C."""

from __future__ import annotations

import copy
import hashlib
import json

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

import gradleak.cli.train  # noqa: F401  (registers `gradleak train` until cli/__init__.py imports it)
from gradleak.cli import app
from gradleak.client import ClientSetup
from gradleak.data import load_builtin
from gradleak.data.request import DataRequest
from gradleak.errors import ConfigError
from gradleak.federated import eval_accuracy
from gradleak.models import ModelSpec
from gradleak.models.weights import apply_weights, read_weights
from gradleak.training import TrainPlan, train_model

CONVNET = ModelSpec("convnet", {"width": 8}, device="cpu")
LENET = ModelSpec("lenet", {"activation": "relu", "init": "default"}, device="cpu")
FACTORIES = '''
import torch

def small(width=16):
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, int(width)), torch.nn.ReLU(),
                               torch.nn.Linear(int(width), 10))

def raises(**options):
    raise RuntimeError("no GPU here")
'''


@pytest.fixture(scope="module")
def digits12():
    """All 1,797 digits at 12 px (ConvNet's two 3x3 poolings need at least 9 px)."""
    return load_builtin("digits", size=12)


@pytest.fixture(scope="module")
def centralised(digits12, tmp_path_factory):
    out = tmp_path_factory.mktemp("convnet")
    return train_model(CONVNET, digits12, TrainPlan(epochs=2, lr=0.05, checkpoints=(1,)), out, quiet=True), out


@pytest.fixture(scope="module")
def federated(digits12, tmp_path_factory):
    out = tmp_path_factory.mktemp("federated")
    plan = TrainPlan(epochs=3, lr=0.1, batch_size=16, clients=3, checkpoints=(1, 2))
    return train_model(CONVNET, digits12.take(900), plan, out, quiet=True), out


@pytest.fixture()
def user_code(tmp_path, monkeypatch):
    (tmp_path / "trainnets.py").write_text(FACTORIES)
    monkeypatch.syspath_prepend(str(tmp_path))


def _step_raises_at(monkeypatch, call: int) -> list[int]:
    """Ctrl-C during the ``call``-th optimiser step (counted from 1)."""
    calls, original = [], torch.optim.SGD.step

    def step(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.SGD, "step", step)
    return calls


# ---------------------------------------------------------------- centralised


def test_a_convnet_learns_the_digits_and_is_measured_on_images_it_never_saw(centralised):
    result, _ = centralised
    # measured: 71.3 % after epoch 1, 91.9 % after epoch 2 (359 held-out digits, 10 classes)
    assert result.held_out_accuracy >= 0.8 and result.train_accuracy >= 0.8
    assert result.curve == {"epoch": [1, 2], "accuracy": [pytest.approx(a) for a in result.curve["accuracy"]]}
    assert result.curve["accuracy"][-1] == result.held_out_accuracy
    assert result.completed == 2 and not result.interrupted
    assert len(result.held_out_indices) == 359 and len(result.train_indices) == 1438
    assert not set(result.held_out_indices) & set(result.train_indices)


def test_the_weights_file_rebuilds_the_trained_model_exactly(centralised, digits12):
    result, out = centralised
    rebuilt = CONVNET.with_(weights=out / "weights.safetensors").build((1, 12, 12), 10)
    x = result.data_spec.normalize(digits12.images[:64])
    for mode in (True, False):   # train mode: batch statistics; eval mode: the trained running statistics
        result.model.train(mode), rebuilt.module.train(mode)
        with torch.no_grad():
            assert torch.equal(result.model(x), rebuilt.module(x))
    running = rebuilt.module.state_dict()["features.1.running_mean"]
    assert torch.equal(running, result.model.state_dict()["features.1.running_mean"]) and running.abs().sum() > 0


def test_training_json_records_the_split_the_curve_and_the_digest(centralised):
    result, out = centralised
    record = json.loads((out / "training.json").read_text())
    assert record["weights_sha256"] == read_weights(out / "weights.safetensors").sha256 == result.weights_sha256
    assert set(record["held_out_indices"]).isdisjoint(record["train_indices"])
    assert len(record["held_out_indices"]) == record["test_size"] == 359 and record["train_size"] == 1438
    assert record["model"]["name"] == "convnet" and record["plan"]["epochs"] == 2 and record["plan"]["client"] is None
    assert record["classes"] == [str(k) for k in range(10)] and record["interrupted"] is False
    assert record["held_out_accuracy"] == result.held_out_accuracy and record["curve"]["epoch"] == [1, 2]
    checkpoint = record["checkpoints"]["1"]
    assert checkpoint["path"] == "checkpoints/epoch-0001.safetensors"
    assert hashlib.sha256((out / checkpoint["path"]).read_bytes()).hexdigest() == checkpoint["sha256"]


def test_the_same_seed_gives_bit_identical_weights(tmp_path):
    digits = load_builtin("digits", n=300)
    plan = TrainPlan(epochs=2, lr=0.05, batch_size=16)
    first = train_model(LENET, digits, plan, tmp_path / "a", quiet=True)
    again = train_model(LENET, digits, plan, tmp_path / "b", quiet=True)
    other = train_model(LENET, digits, TrainPlan(epochs=2, lr=0.05, batch_size=16, seed=1), tmp_path / "c", quiet=True)
    weights = [(tmp_path / run / "weights.safetensors").read_bytes() for run in ("a", "b")]
    assert weights[0] == weights[1]
    assert first.weights_sha256 == again.weights_sha256 != other.weights_sha256
    assert first.held_out_indices != other.held_out_indices   # the seed draws the split too


def test_adam_a_users_factory_and_a_binary_head_train_too(user_code):
    digits = load_builtin("digits", n=400)
    adam = train_model(LENET, digits, TrainPlan(epochs=3, lr=0.01, optimizer="adam"), quiet=True)
    own = train_model(ModelSpec("trainnets:small", device="cpu"), digits, TrainPlan(epochs=3, lr=0.05), quiet=True)
    faces = train_model(ModelSpec("two-layer", device="cpu"), load_builtin("faces"), TrainPlan(epochs=3), quiet=True)
    # measured: 90.0 %, 87.5 % (80 held-out digits, 10 classes), 95.0 % (40 held-out faces, 2 classes)
    assert adam.held_out_accuracy >= 0.75 and own.held_out_accuracy >= 0.75 and faces.held_out_accuracy >= 0.75


# ---------------------------------------------------------------- federated


def test_federated_training_writes_the_chosen_rounds(federated):
    result, out = federated
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["round-0001.safetensors",
                                                                      "round-0002.safetensors"]
    final = read_weights(out / "weights.safetensors")
    first = read_weights(out / "checkpoints" / "round-0001.safetensors")
    assert first.tensors.keys() == final.tensors.keys()
    assert not torch.equal(first.tensors["fc.weight"], final.tensors["fc.weight"])
    record = json.loads((out / "training.json").read_text())
    assert record["curve"]["round"] == [1, 2, 3] and record["plan"]["clients"] == 3
    assert record["plan"]["client"]["protocol"] == "fedavg" and record["plan"]["client"]["epochs"] == 1
    assert record["checkpoints"]["2"]["sha256"] == read_weights(out / "checkpoints" / "round-0002.safetensors").sha256
    CONVNET.with_(weights=out / "checkpoints" / "round-0002.safetensors").build((1, 12, 12), 10)  # loads


def test_federated_batchnorm_statistics_are_averaged_from_the_clients(federated, digits12):
    result, _ = federated
    state = result.model.state_dict()
    assert state["features.1.running_mean"].abs().min() > 0   # moved from their init (zeros)
    assert not torch.equal(state["features.1.running_var"], torch.ones_like(state["features.1.running_var"]))
    # 240 training images per client, minibatches of 16: 15 local steps per round, 3 rounds
    assert int(state["features.1.num_batches_tracked"]) == 45
    # measured (eval mode): 91.7 % on 180 held-out digits with the averaged statistics; 15.6 % with
    # the initial ones
    assert result.held_out_accuracy >= 0.6 and len(result.curve["accuracy"]) == 3
    untouched = copy.deepcopy(result.model)
    for module in untouched.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.reset_running_stats()
    held_out = digits12.select(result.held_out_indices)
    assert eval_accuracy(untouched, held_out, result.data_spec) < result.held_out_accuracy - 0.3


def test_federated_clients_take_their_own_protocol(digits12):
    setup = ClientSetup(protocol="fedsgd")
    result = train_model(CONVNET, digits12.take(300), TrainPlan(epochs=2, clients=3, client=setup, server_lr=0.5),
                         quiet=True)
    assert result.plan.to_json()["client"]["protocol"] == "fedsgd"
    assert int(result.model.state_dict()["features.1.num_batches_tracked"]) == 2   # one forward pass per round


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("changes, needle", [
    ({"epochs": 0}, "epochs must be an integer in 1..100000, got 0"),
    ({"lr": 0}, "lr must be a finite number > 0, got 0"),
    ({"optimizer": "rmsprop"}, "optimizer must be 'sgd' or 'adam', got 'rmsprop'"),
    ({"test_fraction": 1.0}, "test_fraction must be below 1"),
    ({"checkpoints": (3, 11)}, "checkpoint epoch must be an integer in 1..10, got 11"),
    ({"clients": 0}, "clients must be an integer in 1..10000, got 0"),
    ({"clients": 3, "optimizer": "adam"}, "optimizer 'adam' applies to centralised training"),
    ({"client": ClientSetup()}, "client settings apply to federated training"),
    ({"seed": -1}, "seed must be an integer"),
])
def test_a_bad_plan_is_one_line(changes, needle):
    with pytest.raises(ConfigError) as info:
        TrainPlan(**changes)
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_what_cannot_be_trained_is_refused_before_training(tmp_path):
    digits = load_builtin("digits", n=50)
    with pytest.raises(ConfigError, match="checkpoints .* are written under out"):
        train_model(LENET, digits, TrainPlan(epochs=2, checkpoints=(1,)))
    with pytest.raises(ConfigError, match="one output .* but the data has 10 classes"):
        train_model(ModelSpec("two-layer", device="cpu"), digits, TrainPlan(), tmp_path / "x")
    with pytest.raises(ConfigError, match="40 training images cannot be split over clients=41"):
        train_model(LENET, digits, TrainPlan(clients=41), tmp_path / "x")
    with pytest.raises(ConfigError, match="training diverged: .* lower the learning rate"):
        train_model(LENET, digits, TrainPlan(epochs=2, lr=1e30), tmp_path / "x", quiet=True)
    assert not (tmp_path / "x").exists()


# ---------------------------------------------------------------- Ctrl-C


def test_ctrl_c_keeps_what_was_trained(tmp_path, monkeypatch):
    calls = _step_raises_at(monkeypatch, 12)   # 40 images in minibatches of 8: 5 steps an epoch; in epoch 3
    result = train_model(LENET, load_builtin("digits", n=50), TrainPlan(epochs=5, batch_size=8, checkpoints=(1, 4)),
                         tmp_path, quiet=True)
    assert result.interrupted and result.completed == 2 and len(calls) == 12
    record = json.loads((tmp_path / "training.json").read_text())
    assert record["interrupted"] is True and record["completed"] == 2 and list(record["checkpoints"]) == ["1"]
    assert record["weights_sha256"] == read_weights(tmp_path / "weights.safetensors").sha256
    apply_weights(LENET.build((1, 8, 8), 10).module, read_weights(tmp_path / "weights.safetensors"))


def test_ctrl_c_in_federated_training_keeps_the_rounds_finished(tmp_path, monkeypatch):
    import gradleak.defenses

    calls, original = [], gradleak.defenses.defend_client

    def client(*args, **kwargs):
        calls.append(1)
        if len(calls) == 8:   # 3 clients a round: the second client of round 3
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(gradleak.defenses, "defend_client", client)
    data = DataRequest("digits", 300, None, start=100)
    result = train_model(ModelSpec("mlp", device="cpu"), data, TrainPlan(epochs=5, clients=3, checkpoints=(1, 2, 4)),
                         tmp_path, quiet=True)
    record = json.loads((tmp_path / "training.json").read_text())
    assert result.interrupted and record["interrupted"] is True and record["completed"] == 2
    assert list(record["checkpoints"]) == ["1", "2"] and record["curve"]["round"] == [1, 2]
    assert read_weights(tmp_path / "weights.safetensors").sha256 != record["checkpoints"]["1"]["sha256"]
    assert read_weights(tmp_path / "weights.safetensors").sha256 == record["checkpoints"]["2"]["sha256"]
    assert min(record["held_out_indices"] + record["train_indices"]) == 100   # indices into the whole set


# ---------------------------------------------------------------- the command


def _invoke(*args: str):
    return CliRunner().invoke(app, ["train", *args])


def test_the_command_trains_and_says_where_the_weights_are(tmp_path):
    out = tmp_path / "run"
    result = _invoke("--model", "lenet", "-m", "activation=relu", "-m", "init=default", "--data", "digits",
                     "--n", "300", "--size", "8", "--epochs", "2", "--lr", "0.05", "--checkpoint", "1",
                     "--device", "cpu", "--out", str(out))
    assert result.exit_code == 0, result.output
    assert "held-out accuracy" in result.output and str(out / "weights.safetensors") in result.output
    assert (out / "checkpoints" / "epoch-0001.safetensors").is_file()
    record = json.loads((out / "training.json").read_text())
    assert record["data"] == {"name": "digits", "n": 300, "size": 8, "start": 0} and record["test_size"] == 60
    attack = CliRunner().invoke(app, ["capture", "--model", "lenet", "-m", "activation=relu", "-m", "init=default",
                                      "--weights", str(out / "weights.safetensors"), "--data", "digits", "--size", "8",
                                      "--start", str(record["held_out_indices"][0]), "--out",
                                      str(tmp_path / "u.safetensors"), "-q"])
    assert attack.exit_code == 0, attack.output   # a held-out image's update from the trained model


def test_the_command_trains_federatedly_with_client_settings(tmp_path):
    out = tmp_path / "fed"
    result = _invoke("--model", "mlp", "-m", "hidden=32", "--data", "faces", "--size", "8", "--clients", "4",
                     "-c", "local_steps=2", "-c", "lr=0.1", "--epochs", "3", "--checkpoint", "2", "--device", "cpu",
                     "--out", str(out), "-q")
    assert result.exit_code == 0, result.output
    record = json.loads((out / "training.json").read_text())
    assert record["data"]["n"] == 200 and record["plan"]["client"]["local_steps"] == 2
    assert record["plan"]["client"]["epochs"] is None and record["plan"]["client"]["lr"] == 0.1
    assert (out / "checkpoints" / "round-0002.safetensors").is_file()


@pytest.mark.parametrize("args, needle", [
    (["--epochs", "0"], "Invalid value for '--epochs': 0 is not in the range 1<=x<=100000"),
    (["--model", "trainnets:raises"], "the factory raised RuntimeError: no GPU here"),
    (["-c", "lr=0.1"], "--client settings apply to federated training; give --clients N"),
    (["--clients", "3", "-c", "colour=1"], "--client:"),
    (["--data", "no/such/folder"], "neither a built-in data set"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, user_code, args, needle):
    out = tmp_path / "run"
    result = _invoke("--data", "digits", "--n", "40", "--size", "8", "--out", str(out), *args)
    assert result.exit_code == 2 and needle in result.output and result.output.count("\n") == 1, result.output
    assert not out.exists()


def test_weights_of_another_architecture_are_refused(tmp_path):
    mlp = ModelSpec("mlp", device="cpu").build((1, 8, 8), 10).module
    save_file({k: v.contiguous() for k, v in mlp.state_dict().items()}, tmp_path / "mlp.safetensors")
    out = tmp_path / "run"
    result = _invoke("--model", "lenet", "--weights", str(tmp_path / "mlp.safetensors"), "--data", "digits",
                     "--n", "40", "--size", "8", "--out", str(out))
    assert result.exit_code == 2 and "do not fit LeNet" in result.output and result.output.count("\n") == 1
    assert not out.exists()


def test_an_out_that_is_a_file_is_refused_before_training(tmp_path):
    (tmp_path / "taken").write_text("x")
    result = _invoke("--data", "digits", "--n", "40", "--size", "8", "--out", str(tmp_path / "taken"))
    assert result.exit_code == 2 and "is an existing file" in result.output and result.output.count("\n") == 1


def test_ctrl_c_in_the_command_exits_130_with_the_weights_written(tmp_path, monkeypatch):
    _step_raises_at(monkeypatch, 3)
    out = tmp_path / "run"
    result = _invoke("--model", "lenet", "--data", "digits", "--n", "40", "--size", "8", "--batch-size", "8",
                     "--device", "cpu", "--out", str(out), "-q")
    assert result.exit_code == 130 and "interrupted after 0 epoch(s)" in result.output
    assert json.loads((out / "training.json").read_text())["interrupted"] is True
    assert (out / "weights.safetensors").is_file()
