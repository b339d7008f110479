"""Locate fully connected layers by what they do, not by their position in a list.

A probe forward pass (on random inputs, functional, the model untouched) records every
``nn.Linear`` in execution order, whether it is fed the raw model input (flattened), and
whether it produces the model output (the classifier layer). Label recovery and the
analytic attacks find their layers here by name and role.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ConfigError
from ..functional import forward

__all__ = ["LinearTrace", "trace_linear_layers", "classifier_layer"]


@dataclass(frozen=True)
class LinearTrace:
    name: str            # module name ("" for a bare nn.Linear)
    in_features: int
    out_features: int
    has_bias: bool
    receives_model_input: bool
    produces_model_output: bool

    def param(self, which: str) -> str:
        return f"{self.name}.{which}" if self.name else which


def trace_linear_layers(model: nn.Module, input_shape: tuple[int, ...], params: dict[str, torch.Tensor],
                        buffers: dict[str, torch.Tensor]) -> list[LinearTrace]:
    """Every ``nn.Linear`` of ``model`` in the order the forward pass runs them."""
    if input_shape is None:
        raise ConfigError("the input shape is unknown: give it in the ThreatModel (input_shape=(C, H, W)) "
                          "or carry it in the update")
    reference = next(iter(params.values()))
    generator = torch.Generator().manual_seed(0)
    probe = torch.randn((2, *input_shape), generator=generator, dtype=reference.dtype).to(reference.device)
    seen: list[tuple[str, nn.Linear, torch.Tensor, torch.Tensor]] = []
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            def hook(mod, inputs, output, name=name):
                seen.append((name, mod, inputs[0].detach(), output.detach()))
            handles.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            output = forward(model, params, buffers, probe)
    finally:
        for handle in handles:
            handle.remove()
    flat_probe = probe.reshape(2, -1)
    traces = []
    for name, module, x, y in seen:
        traces.append(LinearTrace(
            name=name,
            in_features=module.in_features,
            out_features=module.out_features,
            has_bias=module.bias is not None,
            receives_model_input=x.shape == (2, flat_probe.shape[1]) and torch.equal(x.reshape(2, -1), flat_probe),
            produces_model_output=y.shape == output.shape and torch.equal(y, output),
        ))
    return traces


def classifier_layer(traces: list[LinearTrace]) -> LinearTrace | None:
    """The linear layer whose output is the model output, if any."""
    return next((t for t in reversed(traces) if t.produces_model_output), None)
