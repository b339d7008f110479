"""Simulated clients: FedSGD and FedAvg agree with plain PyTorch training, leave the model
untouched, and are deterministic given a seed."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradleak import DataSpec, fedavg_update, fedsgd_update
from gradleak.errors import ConfigError
from gradleak.models import LeNet


@pytest.fixture()
def lenet():
    torch.manual_seed(0)
    return LeNet().double()


def test_fedsgd_equals_autograd_on_the_normalized_batch(lenet, photos):
    spec = DataSpec.from_images(photos.images)
    x, y = photos.images[:4].double(), photos.labels[:4]
    update = fedsgd_update(lenet, x, y, spec=spec)
    lenet.zero_grad()
    F.cross_entropy(lenet(spec.normalize(x)), y).backward()
    for name, p in lenet.named_parameters():
        torch.testing.assert_close(update.tensors[name], p.grad, rtol=1e-12, atol=1e-14, msg=name)
    assert update.batch_size == 4 and update.kind == "gradient"


def test_fedavg_equals_torch_sgd_and_leaves_the_model_untouched(lenet, photos):
    x, y = photos.images[:4].double(), photos.labels[:4]
    before = copy.deepcopy(lenet.state_dict())
    delta = fedavg_update(lenet, x, y, lr=0.1, local_steps=3)
    for name, value in lenet.state_dict().items():
        assert torch.equal(value, before[name]), f"{name} was modified"
    trained = copy.deepcopy(lenet)
    optimizer = torch.optim.SGD(trained.parameters(), lr=0.1)
    for _ in range(3):  # full-batch steps: order does not matter
        optimizer.zero_grad()
        F.cross_entropy(trained(x), y).backward()
        optimizer.step()
    for (name, p0), p1 in zip(lenet.named_parameters(), trained.parameters()):
        torch.testing.assert_close(delta.tensors[name], p1.detach() - p0.detach(), rtol=1e-10, atol=1e-13, msg=name)
    assert (delta.kind, delta.local_steps, delta.local_lr) == ("delta", 3, 0.1)


def test_one_step_delta_is_minus_lr_times_the_gradient(lenet, photos):
    x, y = photos.images[:2].double(), photos.labels[:2]
    grad = fedsgd_update(lenet, x, y).tensors
    delta = fedavg_update(lenet, x, y, lr=0.25, local_steps=1)
    for name in grad:
        torch.testing.assert_close(delta.as_gradient()[name], grad[name], rtol=1e-12, atol=1e-14)


def test_epochs_over_minibatches_count_steps_and_depend_on_the_seed(lenet, photos):
    x, y = photos.images[:6].double(), photos.labels[:6]
    a = fedavg_update(lenet, x, y, lr=0.5, epochs=2, local_batch_size=4, seed=1)
    b = fedavg_update(lenet, x, y, lr=0.5, epochs=2, local_batch_size=4, seed=1)
    c = fedavg_update(lenet, x, y, lr=0.5, epochs=2, local_batch_size=4, seed=2)
    assert a.local_steps == 4  # ceil(6 / 4) = 2 minibatches per epoch
    assert all(torch.equal(a.tensors[n], b.tensors[n]) for n in a.tensors)
    assert any(not torch.equal(a.tensors[n], c.tensors[n]) for n in a.tensors)


def test_randomness_in_the_forward_pass_follows_the_seed_not_the_global_rng(photos):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 64), nn.Dropout(0.5), nn.Linear(64, 10)).train()
    x, y = photos.images[:2], photos.labels[:2]
    state = torch.get_rng_state()
    a = fedsgd_update(model, x, y, seed=11)
    assert torch.equal(torch.get_rng_state(), state), "the caller's RNG state changed"
    torch.manual_seed(999)
    b = fedsgd_update(model, x, y, seed=11)
    c = fedsgd_update(model, x, y, seed=12)
    assert torch.equal(a.tensors["1.weight"], b.tensors["1.weight"])
    assert not torch.equal(a.tensors["1.weight"], c.tensors["1.weight"])


def test_bad_client_arguments_are_named(lenet, photos):
    x, y = photos.images[:2].double(), photos.labels[:2]
    with pytest.raises(ConfigError, match="exactly one of local_steps and epochs"):
        fedavg_update(lenet, x, y, lr=0.1)
    with pytest.raises(ConfigError, match="lr must be a finite number > 0"):
        fedavg_update(lenet, x, y, lr=-1.0, local_steps=1)
    with pytest.raises(ConfigError, match="one label per image"):
        fedsgd_update(lenet, x, y[:1])
    with pytest.raises(ConfigError, match="integer class indices"):
        fedsgd_update(lenet, x, y.double())
