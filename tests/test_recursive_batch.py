"""benchmarks/recursive_batch.py's linear step: a convolution's batch weight gradient, with each
image's output delta known, gives every image's input exactly (the recursion of R-GAP on a batch)."""

from __future__ import annotations

import torch
from torch.nn.grad import conv2d_weight

from benchmark_support import benchmark_module


def _batch_gradient(photos, scales):
    """Four photos as a 3-channel input of a 3x3 conv with 64 outputs at 10x10 (576 equations per input channel for 400 unknowns); each image's delta
    scaled as a trained network scales them (one image holds almost all of the update)."""
    images = torch.nn.functional.interpolate(photos.images[:4].double(), size=(10, 10), mode="area")
    generator = torch.Generator().manual_seed(0)
    deltas = torch.randn(4, 64, 10, 10, generator=generator, dtype=torch.float64)
    deltas = deltas * torch.tensor(scales, dtype=torch.float64)[:, None, None, None]
    weight_grad = conv2d_weight(images, (64, 3, 3, 3), deltas, padding=1)
    return images, deltas, weight_grad


def test_every_image_of_a_batch_is_solved_exactly_even_at_a_thousandth_of_the_update(photos):
    images, deltas, weight_grad = _batch_gradient(photos, [1e-3, 1.0, 3e-3, 1e-3])
    with benchmark_module("recursive_batch", also_imports=("trained_grid",)) as rb:
        solved, residual = rb.conv_input_from_weight_grad(weight_grad, deltas)
    errors = [(solved[i] - images[i]).norm() / images[i].norm() for i in range(4)]
    assert max(errors) < 1e-9, errors
    assert residual < 1e-12


def test_a_wrong_delta_shows_in_the_residual(photos):
    images, deltas, weight_grad = _batch_gradient(photos, [1e-3, 1.0, 3e-3, 1e-3])
    wrong = deltas.clone()
    wrong[0, 3, 4, 4] = 0.0                    # one entry of the smallest image's delta dropped (a wrong ReLU mask)
    with benchmark_module("recursive_batch", also_imports=("trained_grid",)) as rb:
        _, right_residual = rb.conv_input_from_weight_grad(weight_grad, deltas)
        _, wrong_residual = rb.conv_input_from_weight_grad(weight_grad, wrong)
    assert wrong_residual > 1e4 * max(right_residual, 1e-16)


def test_max_pool_switches_follow_from_one_linear_solve_once_the_inputs_are_known(photos):
    """Given every image's conv input, each output channel's weight gradient is linear in the relaxed
    weights of its windows' 9 positions; the least-squares weights are one-hot at the true switches,
    with no start (on a trained batch the inputs are what is missing: docs/models.md)."""
    generator = torch.Generator().manual_seed(1)
    filters = torch.randn(64, 3, 3, 3, generator=generator, dtype=torch.float64)
    features = torch.relu(torch.nn.functional.conv2d(photos.images[:4].double(), filters, padding=1))
    inputs = torch.nn.functional.interpolate(features, size=(10, 10), mode="area")   # 64 channels, as conv6's
    _, switch = torch.nn.functional.max_pool2d(torch.randn(4, 64, 10, 10, generator=generator, dtype=torch.float64),
                                               3, return_indices=True)
    values = torch.randn(4, 64, 3, 3, generator=generator, dtype=torch.float64)
    values = values * torch.tensor([1e-3, 1.0, 3e-3, 1e-3], dtype=torch.float64)[:, None, None, None]
    deltas = torch.nn.functional.max_unpool2d(values, switch, 3, output_size=(10, 10))
    weight_grad = conv2d_weight(inputs, (64, 64, 3, 3), deltas, padding=1)
    with benchmark_module("recursive_batch", also_imports=("trained_grid",)) as rb:
        found, residual = rb.switches_from_inputs(weight_grad, inputs, values)
        assert torch.equal(found, switch), int((found != switch).sum())
        assert residual < 1e-9
        moved = rb.perturbed_switches(switch, values != 0, 200)       # the helper the diagnosis uses
        blurred, _ = rb.switches_from_inputs(weight_grad, inputs + 0.3 * inputs.roll(1, -1), values)
    assert int((moved != switch).sum()) == 200
    assert int((blurred != switch).sum()) > 100, int((blurred != switch).sum())   # wrong inputs: wrong switches
