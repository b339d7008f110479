"""Hostile model factories: the user's own code, as broken or as strange as code gets.

``--model package.module:factory`` imports the user's module and calls the factory; whatever
that code does, :meth:`~gradleak.models.ModelSpec.build` must return a usable model (dense,
finite, floating parameters; class scores of shape (B, K) for a batch) or refuse in one line
naming the spec, and ``sys.exit()``, ``GeneratorExit`` or a ``BaseException`` of the user's own
must not end gradleak. Each input is a freshly written module built from one behaviour:

- ``import``: the module raises, exits, recurses, has a syntax error, prints, at import time;
- ``factory``: the factory raises anything (exceptions whose message cannot be printed, custom
  ``BaseException`` subclasses, ``SystemExit``, ``GeneratorExit``), rejects its options, returns
  something that is not a model;
- ``tensors``: the model's parameters are on the meta device, sparse, complex, integer,
  half precision, NaN, or absent;
- ``forward``: the forward pass returns a tuple, None, integers, the wrong batch, no classes,
  NaN, or raises, exits, recurses;
- ``valid``: well-formed factories with random widths (these must load).
"""

from __future__ import annotations

import contextlib
import io
import random
import sys
from pathlib import Path
from typing import Callable

import torch

from ._engine import Campaign, run_inputs

__all__ = ["KINDS", "hostile_factories", "run_factories"]

KINDS = ("import", "factory", "tensors", "forward", "valid")
SHAPE = (3, 8, 8)

_HEAD = "import sys, torch\nfrom torch import nn\n"
_NET = ("class Net(nn.Module):\n"
        "    def __init__(self, width=4):\n"
        "        super().__init__()\n"
        "        self.fc = nn.Linear(3 * 8 * 8, int(width))\n"
        "        self.out = nn.Linear(int(width), 10)\n"
        "    def forward(self, x):\n"
        "        {body}\n")
_FORWARD = "return self.out(torch.relu(self.fc(x.flatten(1))))"

_IMPORT = ["raise RuntimeError('no GPU here')", "sys.exit(0)", "sys.exit('bye')", "raise SystemExit(3)",
           "def f(:\n    pass", "import no_such_module_anywhere", "print('hello from import')",
           "def r(n): return r(n + 1)\nr(0)", "raise GeneratorExit", "class B(BaseException): pass\nraise B('x')",
           "raise KeyError('a\\nb\\nc')", "x = 1 / 0"]
_RAISE = ["raise ValueError('bad\\nsecond line')", "raise TypeError()", "raise MemoryError()", "sys.exit(0)",
          "sys.exit(None)", "raise SystemExit(2)", "raise GeneratorExit", "raise StopIteration",
          "raise AssertionError('x' * 10000)", "return 1 / 0", "def r(n): return r(n + 1)\n    return r(0)",
          "class B(BaseException): pass\n    raise B('mine')",
          "class E(Exception):\n        def __str__(self): raise RuntimeError('no str')\n    raise E()",
          "return None", "return 3", "return 'net'", "return [Net()]", "return Net", "return lambda x: x",
          "return Net(width=options['width'])", "return torch.zeros(3)"]
_TENSORS = ["with torch.device('meta'):\n        return Net()",
            "net = Net()\n    net.fc.weight = nn.Parameter(net.fc.weight.detach().to_sparse())\n    return net",
            "net = Net()\n    net.fc.weight = nn.Parameter(net.fc.weight.detach().to(torch.complex64))\n    return net",
            "net = Net()\n    net.fc.weight = nn.Parameter(torch.zeros(4, 192, dtype=torch.int64), requires_grad=False)\n"
            "    return net",
            "net = Net()\n    net.register_buffer('z', torch.zeros(2, dtype=torch.complex64))\n    return net",
            "net = Net()\n    with torch.no_grad(): net.fc.weight[0, 0] = float('nan')\n    return net",
            "net = Net()\n    with torch.no_grad(): net.out.bias.fill_(float('inf'))\n    return net",
            "return Net().half()", "return Net().double()", "return nn.ReLU()", "return nn.Sequential()",
            "net = Net()\n    net.register_buffer('count', torch.zeros(1, dtype=torch.int64))\n    return net"]
_FORWARD_BODIES = ["return (self.out(self.fc(x.flatten(1))),)", "return None", "return x.flatten(1).long()",
                   "return self.out(self.fc(x.flatten(1)))[:1]", "return self.out(self.fc(x.flatten(1)))[:, :0]",
                   "return self.out(self.fc(x.flatten(1))) * float('nan')",
                   "return self.out(self.fc(x.flatten(1))).unsqueeze(1)", "return self.out(self.fc(x.flatten(1)))[0]",
                   "raise RuntimeError('forward\\nfailed')", "sys.exit(4)", "raise GeneratorExit",
                   "return self.forward(x)", "return {'logits': self.out(self.fc(x.flatten(1)))}",
                   "return self.out(self.fc(x.flatten(1))).to_sparse()",
                   "print('forward!'); return self.out(self.fc(x.flatten(1)))",
                   "return self.out(self.fc(x[:, :, :4].flatten(1)))"]


def _source(rng: random.Random, kind: str) -> tuple[str, dict]:
    """(module source, options) of one hostile behaviour of ``kind``."""
    options: dict = {}
    if kind == "import":
        return _HEAD + rng.choice(_IMPORT) + "\n" + _NET.format(body=_FORWARD) + "def f(**o):\n    return Net()\n", {}
    if kind == "factory":
        body = rng.choice(_RAISE)
        if rng.random() < 0.3:
            options = rng.choice([{"colour": 1}, {"width": -1}, {"width": 10**12}, {"width": "x"}, {"width": 0}])
        return _HEAD + _NET.format(body=_FORWARD) + f"def f(**options):\n    {body}\n", options
    if kind == "tensors":
        return _HEAD + _NET.format(body=_FORWARD) + f"def f(**options):\n    {rng.choice(_TENSORS)}\n", {}
    if kind == "forward":
        return _HEAD + _NET.format(body=rng.choice(_FORWARD_BODIES)) + "def f(**options):\n    return Net()\n", {}
    width = rng.choice([1, 2, 7, 16, 33])
    return _HEAD + _NET.format(body=_FORWARD) + "def f(width=4):\n    return Net(width)\n", {"width": width}


def hostile_factories(folder: Path, n: int, seed: int = 0) -> list[tuple[str, tuple[str, dict]]]:
    """Write ``n`` modules into ``folder``: ``[(kind, (spec, options))]``, seeded."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    inputs = []
    for index in range(n):
        kind = KINDS[index % len(KINDS)]
        source, options = _source(rng, kind)
        name = f"fuzz_factory_{seed}_{index:06d}"
        (folder / f"{name}.py").write_text(source)
        inputs.append((kind, (f"{name}:f", options)))
    return inputs


def run_factories(folder: Path, n: int, seed: int = 0, progress: Callable[[int], None] | None = None) -> Campaign:
    """Generate ``n`` hostile factories and build each as ``--model MODULE:f`` would."""
    from ..models import ModelSpec

    inputs = hostile_factories(folder, n, seed)
    sys.path.insert(0, str(folder))

    def load(item: tuple[str, dict]):
        spec, options = item
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # the user's print(): theirs, not ours to show
                return ModelSpec(spec, options, device="cpu").build(SHAPE, 10)
        finally:
            sys.modules.pop(spec.partition(":")[0], None)

    def check(built) -> None:
        for name, tensor in built.module.state_dict().items():
            if tensor.is_meta or tensor.layout != torch.strided:
                raise ValueError(f"{name!r} is not dense")
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise ValueError(f"{name!r} is not finite")
        with torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):
            out = built.module(torch.zeros((3, *SHAPE), dtype=built.dtype))
        if not (isinstance(out, torch.Tensor) and out.shape == (3, 10)):
            raise ValueError(f"class scores of shape {getattr(out, 'shape', None)}")

    try:
        return run_inputs("factories", inputs, load, check, describe=lambda item: item[0].partition(":")[0],
                          progress=progress)
    finally:
        sys.path.remove(str(folder))


run = run_factories  # the surface's entry point for gradleak.fuzz.run_surface
