"""Model factories (``package.module:factory``): the user's own code, named on the command line.
Whatever goes wrong importing or calling it is one line naming the spec; nothing is imported
from a file's contents (update files name zoo models only, see test_update_hostile.py)."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from gradleak.analysis import load_model_spec
from gradleak.cli import app
from gradleak.errors import ConfigError

MODULE = '''
import torch

def raises(**options):
    raise RuntimeError("boom\\nsecond line")

def not_a_module(**options):
    return 3

def no_parameters(**options):
    return torch.nn.ReLU()

def wrong_input(**options):
    return torch.nn.Linear(5, 2)

def good(width=4):
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, int(width)), torch.nn.ReLU(),
                               torch.nn.Linear(int(width), 10))
'''


@pytest.fixture()
def user_code(tmp_path, monkeypatch):
    (tmp_path / "usermodels.py").write_text(MODULE)
    (tmp_path / "broken_syntax.py").write_text("def f(:\n")
    (tmp_path / "fails_on_import.py").write_text("raise SystemError('no GPU here')\n")
    monkeypatch.syspath_prepend(str(tmp_path))


@pytest.mark.parametrize("spec, needle", [
    ("usermodels:raises", "the factory raised RuntimeError: boom second line"),
    ("usermodels:not_a_module", "the factory returned int, not an nn.Module"),
    ("usermodels:no_parameters", "the model has no parameters"),
    ("usermodels:wrong_input", "does not accept an input of shape (3, 8, 8)"),
    ("usermodels:missing", "'usermodels' has no callable 'missing'"),
    ("no_such_module:f", "cannot import 'no_such_module' (ModuleNotFoundError"),
    ("broken_syntax:f", "cannot import 'broken_syntax' (SyntaxError"),
    ("fails_on_import:f", "cannot import 'fails_on_import' (SystemError: no GPU here)"),
])
def test_a_failing_factory_is_one_line(user_code, spec, needle):
    with pytest.raises(ConfigError, match=None) as info:
        load_model_spec(spec, (3, 8, 8))
    assert needle in str(info.value) and "\n" not in str(info.value)
    result = CliRunner().invoke(app, ["analyze", "--model", spec, "--input-shape", "3x8x8"])
    assert result.exit_code == 2 and needle in result.output and result.output.count("\n") == 1


def test_a_factory_gets_the_model_options(user_code):
    model, loss = load_model_spec("usermodels:good", (3, 8, 8), width=7)
    assert model[1].out_features == 7 and loss == "cross_entropy"


@pytest.mark.parametrize("shape, needle", [
    ("3x8", None), ("3xax8", "--input-shape must look like 3x32x32"), ("3x100000x100000", "exceeds the limit"),
    ("0x8x8", "must be an integer in 1.."), ("3x" + "9" * 30 + "x8", "--input-shape must look like 3x32x32"),
])
def test_bad_input_shapes_are_one_line(shape, needle):
    result = CliRunner().invoke(app, ["analyze", "--model", "mlp", "--input-shape", shape])
    if needle is None:  # a 2-D input is not an image but a valid shape for an MLP
        assert result.exit_code in (0, 2) and "Traceback" not in result.output
        return
    assert result.exit_code == 2 and needle in result.output and result.output.count("\n") == 1


PACKAGE = '''
import torch

def make_net(input_shape, num_classes, depth=1):
    """Sized from what gradleak passes: the input shape and the class count."""
    c, h, w = input_shape
    layers = [torch.nn.Flatten(), torch.nn.Linear(c * h * w, 16), torch.nn.ReLU()]
    for _ in range(int(depth) - 1):
        layers += [torch.nn.Linear(16, 16), torch.nn.ReLU()]
    return torch.nn.Sequential(*layers, torch.nn.Linear(16, num_classes))
'''


def test_a_package_in_the_current_folder_is_found_and_sized_by_the_contract(tmp_path, monkeypatch):
    """`gradleak` (a console script) does not have the current folder on its path; a factory named
    on the command line is looked up there too, as `python -m` would, and receives input_shape and
    num_classes because its signature names them."""
    import sys

    (tmp_path / "mypkg").mkdir()
    (tmp_path / "mypkg" / "__init__.py").write_text("")
    (tmp_path / "mypkg" / "nets.py").write_text(PACKAGE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    module, _ = load_model_spec("mypkg.nets:make_net", (1, 8, 8), depth=2)
    assert module[1].in_features == 64 and module[-1].out_features == 10   # greyscale 8x8, 10 classes
    assert str(tmp_path) not in sys.path                       # the path is left as it was
    sys.modules.pop("mypkg.nets", None), sys.modules.pop("mypkg", None)
    result = CliRunner().invoke(app, ["analyze", "--model", "mypkg.nets:make_net", "-m", "depth=2",
                                      "--input-shape", "1x8x8", "--num-classes", "3", "--json"])
    assert result.exit_code == 0, result.output
    sys.modules.pop("mypkg.nets", None), sys.modules.pop("mypkg", None)


def test_a_missing_module_and_a_wrong_signature_say_what_the_contract_is(tmp_path, monkeypatch, user_code):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as info:
        load_model_spec("nowhere_to_be_found.nets:make_net", (3, 8, 8))
    assert "from the current folder" in str(info.value) and str(tmp_path) in str(info.value)
    with pytest.raises(ConfigError) as info:
        load_model_spec("usermodels:good", (3, 8, 8), depth=3)      # good() takes width only
    message = str(info.value)
    assert "unexpected keyword argument 'depth'" in message and "factory(**options)" in message
    assert "input_shape=(C, H, W) and num_classes=K" in message
