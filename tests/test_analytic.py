"""The closed-form attack of the exercise: exact recovery, and clear refusals where invalid."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gradleak import DataSpec, FCBiasInversion, ThreatModel, fc_bias_inversion, fedavg_update, fedsgd_update
from gradleak.errors import AttackNotApplicable
from gradleak.metrics import psnr
from gradleak.models import MLP, LeNet, TwoLayerNet, exercise_gradients

FLOORS = {torch.float32: 60.0, torch.float64: 100.0}


def _dtype_id(dtype):
    return str(dtype).removeprefix("torch.")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=_dtype_id)
def test_exercise_network_recovers_a_real_face_exactly(faces, dtype):
    torch.manual_seed(0)
    image, label = faces.images[10:11].to(dtype), faces.labels[10:11]  # a face (label 1), 1x25x25
    model = TwoLayerNet(image[0].numel(), hidden=32).to(dtype)
    spec = DataSpec.from_images(faces.images.to(dtype))
    update = fedsgd_update(model, image, label, loss="binary_cross_entropy", spec=spec)
    result = FCBiasInversion(model).reconstruct(update)
    assert result.images.shape == image.shape
    assert float(psnr(result.images, image)[0]) >= FLOORS[dtype]
    assert result.labels.tolist() == label.tolist()  # the sign of dL/db2 = p - y


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=_dtype_id)
def test_four_layer_mlp_recovers_every_photo_exactly(photos, dtype):
    torch.manual_seed(1)
    model = MLP(3 * 32 * 32, hidden=(128, 64, 32), num_classes=10).to(dtype)
    spec = DataSpec.from_images(photos.images)
    for k in range(len(photos)):
        image, label = photos.images[k : k + 1].to(dtype), photos.labels[k : k + 1]
        result = FCBiasInversion(model).reconstruct(fedsgd_update(model, image, label, spec=spec))
        assert float(psnr(result.images, image)[0]) >= FLOORS[dtype], photos.classes[k]
        assert result.labels.tolist() == label.tolist()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=_dtype_id)
def test_cnn_classifier_input_features_recovered(photos, dtype):
    torch.manual_seed(2)
    model = LeNet().to(dtype)
    image, label = photos.images[3:4].to(dtype), photos.labels[3:4]
    captured = {}
    update = fedsgd_update(model, image, label)
    handle = model.fc.register_forward_hook(lambda m, inputs, out: captured.update(x=inputs[0].detach()))
    model(image)
    handle.remove()
    result = FCBiasInversion(model).reconstruct(update)
    assert result.images is None and set(result.features) == {"fc"}
    truth = captured["x"]
    error = (result.features["fc"] - truth).abs().max() / truth.abs().max()
    assert float(error) < 100 * torch.finfo(dtype).eps
    assert any("not fed the raw input" in note for note in result.notes)
    assert result.labels.tolist() == label.tolist()


def test_closed_form_exercise_gradients_equal_autograd(faces):
    torch.manual_seed(3)
    x = faces.images[95:105].double()  # five faces, then five non-faces
    y = faces.labels[95:105]
    model = TwoLayerNet(x[0].numel(), hidden=16).double()
    update = fedsgd_update(model, x, y, loss="binary_cross_entropy")
    closed = exercise_gradients(model, x, y)
    assert set(closed) == set(update.tensors)
    for name, value in closed.items():
        torch.testing.assert_close(value, update.tensors[name], rtol=1e-12, atol=1e-15, msg=name)


def test_function_level_inversion_is_the_row_ratio(photos):
    x = photos.images[0].double().reshape(-1)
    delta = torch.tensor([0.5, 0.0, -2.0, 1e-3], dtype=torch.float64)
    inversion = fc_bias_inversion(torch.outer(delta, x), delta)
    torch.testing.assert_close(inversion.x, x, rtol=1e-15, atol=1e-15)
    assert inversion.active_units.tolist() == [2, 0, 3]  # by |dL/db| descending; unit 1 is inactive
    assert inversion.rank_one_residual < 1e-15


def test_all_units_dead_is_reported_not_garbage(photos):
    model = TwoLayerNet(3 * 32 * 32, hidden=8)
    with torch.no_grad():
        model.fc1.bias.fill_(-1e3)  # every ReLU is dead for inputs in a normal range
    update = fedsgd_update(model, photos.images[:1], torch.tensor([1]), loss="binary_cross_entropy")
    with pytest.raises(AttackNotApplicable, match="every dL/db_j is zero") as info:
        FCBiasInversion(model).reconstruct(update)
    assert info.value.condition == "some dL/db_j != 0"


def test_batch_of_two_is_refused_by_metadata_and_by_rank(photos):
    torch.manual_seed(4)
    model = MLP(3 * 32 * 32, hidden=(64,), num_classes=10)
    update = fedsgd_update(model, photos.images[:2], photos.labels[:2])
    with pytest.raises(AttackNotApplicable, match="batch of 2"):
        FCBiasInversion(model).reconstruct(update)
    # Without the batch size, the attack still sees that the gradient mixes two samples: the strict
    # closed form refuses; the robust default returns the best rank-one estimate, marked approximate.
    hidden = ThreatModel(batch_size_known=False)
    with pytest.raises(AttackNotApplicable, match="not rank one"):
        FCBiasInversion(model, hidden, robust=False).reconstruct(update)
    estimate = FCBiasInversion(model, hidden).reconstruct(update)
    assert any(note.startswith("APPROXIMATE: the gradient is not rank one") for note in estimate.notes)


def test_single_step_delta_inverts_and_multi_step_delta_is_refused(photos):
    torch.manual_seed(5)
    model = MLP(3 * 32 * 32, hidden=(64,), num_classes=10)
    image, label = photos.images[5:6], photos.labels[5:6]
    one = fedavg_update(model, image, label, lr=0.05, local_steps=1)
    assert float(psnr(FCBiasInversion(model).reconstruct(one).images, image)[0]) >= 60
    several = fedavg_update(model, image, label, lr=0.05, local_steps=3)
    with pytest.raises(AttackNotApplicable, match="3 local steps"):
        FCBiasInversion(model).reconstruct(several)


def test_layer_without_bias_and_unknown_layer_are_named(photos):
    model = MLP(3 * 32 * 32, hidden=(16,), num_classes=10, bias=False)
    update = fedsgd_update(model, photos.images[:1], photos.labels[:1])
    with pytest.raises(AttackNotApplicable, match="no fully connected layer with bias"):
        FCBiasInversion(model).reconstruct(update)
    with pytest.raises(Exception, match="'nope' is not a linear layer"):
        FCBiasInversion(model, layer="nope").reconstruct(update)


def test_user_module_with_first_linear_after_a_reshape(photos):
    class Custom(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = nn.Linear(3 * 32 * 32, 40)
            self.head = nn.Sequential(nn.Tanh(), nn.Linear(40, 10))

        def forward(self, x):
            return self.head(self.encoder(x.view(x.shape[0], -1)))

    torch.manual_seed(6)
    model = Custom().double()
    image = photos.images[7:8].double()
    update = fedsgd_update(model, image, photos.labels[7:8])
    result = FCBiasInversion(model).reconstruct(update)
    assert float(psnr(result.images, image)[0]) >= 100
