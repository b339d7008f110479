"""The audit config is untrusted input: every bad value gets one ConfigError line naming the key
and the failed condition, before anything runs or is written, and no size is allocated unchecked.

Each test reproduces a defect a hostile tester found (or one found while hardening); no attack runs.
"""

from __future__ import annotations

import math
import os

import pytest
import yaml
from typer.testing import CliRunner

from gradleak.audit import AuditConfig, load_audit_config
from gradleak.audit import config as audit_config
from gradleak.cli import app
from gradleak.client import ClientSetup
from gradleak.errors import ConfigError, GradleakError
from gradleak.threat import ThreatModel

BASE = {
    "name": "hostile",
    "data": {"name": "photos", "n": 2, "size": 16},
    "models": ["mlp"],
    "attacks": ["fc-bias"],
    "utility": False,
}


def _yaml(tmp_path, content, name="audit.yaml"):
    """Write ``content`` (text, bytes or a mapping merged into BASE) as a config file."""
    path = tmp_path / name
    if isinstance(content, dict):
        content = yaml.safe_dump(BASE | content, sort_keys=False)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


def refused(call, *needles) -> str:
    """``call()`` raises a one-line ConfigError (a GradleakError) containing every needle."""
    with pytest.raises(ConfigError) as info:
        call()
    message = str(info.value)
    assert isinstance(info.value, GradleakError)
    assert "\n" not in message and "\r" not in message, message
    assert len(message) < 400, message
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"
    return message


def cli_refuses(tmp_path, path, *needles) -> str:
    """``gradleak audit PATH`` exits 2 with one stderr line and writes nothing."""
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["audit", str(path), "--out", str(out)])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    assert not out.exists()
    return lines[0]


def mapping_refused(change, *needles) -> str:
    return refused(lambda: AuditConfig.from_mapping(BASE | change), *needles)


def test_the_base_config_is_valid(tmp_path):
    config = load_audit_config(_yaml(tmp_path, {}))
    assert config.name == "hostile" and config.utility is None


# ---------------------------------------------------------------- 1. unknown keys of mixed types
@pytest.mark.parametrize("text, needles", [
    ("1: x\nzz: y\n", ["the audit config", "1"]),
    ("data: {name: photos, n: 2, 1: a, zz: b}\n", ["data", "1"]),
    ("utility: {1: 2, zz: 3}\n", ["utility", "1"]),
    ("models: [{name: mlp, 1: a, zz: b}]\n", ["models[0]", "1"]),
    ("threat: {null: 1, zz: 2}\n", ["threat", "None"]),
    ("client: {true: 1, zz: 2}\n", ["client", "True"]),
])
def test_unknown_keys_of_different_types_are_named(tmp_path, text, needles):
    body = yaml.safe_dump({k: v for k, v in BASE.items() if k not in yaml.safe_load(text)}, sort_keys=False)
    path = _yaml(tmp_path, body + text)
    refused(lambda: load_audit_config(path), *needles)
    cli_refuses(tmp_path, path, *needles)


def test_key_checks_sort_keys_of_mixed_types():
    """The helpers themselves (reached from Python with mixed keys) name a key, never TypeError."""
    refused(lambda: audit_config._check_keys("verdict", {1: 1, "zz": 2}, audit_config.VerdictRule),
            "verdict: unknown key")
    refused(lambda: audit_config._named("models[0]", {"name": "mlp", 1: 1, "zz": 2}), "models[0]: unknown key")


# ---------------------------------------------------------------- 2. bytes that are not UTF-8
def test_a_non_utf8_byte_names_the_file_and_offset(tmp_path):
    path = _yaml(tmp_path, b"name: caf\xe9\nmodels: [mlp]\nattacks: [fc-bias]\n")
    message = refused(lambda: load_audit_config(path), "audit.yaml", "UTF-8", "offset 9", "0xe9", "line 1")
    assert "codec" not in message
    cli_refuses(tmp_path, path, "offset 9")


# ---------------------------------------------------------------- 3. name, seed, dtype up front
@pytest.mark.parametrize("change, needles", [
    ({"seed": "abc"}, ["seed", "'abc'"]),
    ({"seed": -1}, ["seed", "0.."]),
    ({"seed": 2**63}, ["seed"]),
    ({"seed": True}, ["seed", "True"]),
    ({"seed": 1.5}, ["seed", "1.5"]),
    ({"name": 123}, ["name", "string"]),
    ({"name": ["a"]}, ["name", "string"]),
    ({"name": "x" * 201}, ["name", "200"]),
    ({"name": "two\nlines"}, ["name", "line"]),
    ({"name": "  "}, ["name", "empty"]),
    ({"dtype": "float16"}, ["dtype", "float16"]),
    ({"dtype": ["float32"]}, ["dtype"]),
])
def test_name_seed_dtype_are_refused_before_anything_is_written(tmp_path, change, needles):
    mapping_refused(change, *needles)
    cli_refuses(tmp_path, _yaml(tmp_path, change), *needles)


def test_name_seed_dtype_are_checked_in_python_too():
    from gradleak.audit import AttackChoice, ModelChoice

    make = lambda **kw: AuditConfig(models=(ModelChoice("mlp"),), attacks=(AttackChoice("fc-bias"),),  # noqa: E731
                                    data={"name": "photos", "n": 2, "size": 16}, utility=None, **kw)
    assert make(seed=2**63 - 1).seed == 2**63 - 1
    refused(lambda: make(seed="abc"), "seed")
    refused(lambda: make(name=None), "name")
    refused(lambda: make(dtype="half"), "dtype")


# ---------------------------------------------------------------- 4. data, bounded
@pytest.mark.parametrize("data, needles", [
    ({"size": 100000}, ["data.size", "4..512", "100000"]),
    ({"size": 3}, ["data.size", "4..512"]),
    ({"size": "32"}, ["data.size", "'32'"]),
    ({"size": 2.5}, ["data.size"]),
    ({"n": 0}, ["data.n", "positive"]),
    ({"n": 100001}, ["data.n", "100000"]),
    ({"n": True}, ["data.n"]),
    ({"n": "4"}, ["data.n"]),
    ({"name": ""}, ["data.name", "non-empty"]),
    ({"name": 5}, ["data.name", "string"]),
    ({"name": ["photos"]}, ["data.name", "string"]),
    ({"colour": 1}, ["data", "unknown key 'colour'", "name, n, size"]),
    ({"n": 100000, "size": 512}, ["data: n=100000", "over the limit"]),
    ({"name": "no/such/folder"}, ["data.name", "built-in data set", "existing path"]),
    ({"name": "bad\x00name"}, ["data.name", "existing path"]),
])
def test_data_is_validated_and_bounded_up_front(tmp_path, data, needles):
    change = {"data": BASE["data"] | data}
    mapping_refused(change, *needles)
    cli_refuses(tmp_path, _yaml(tmp_path, change), *needles)


def test_data_size_none_is_the_native_size():
    config = AuditConfig.from_mapping(BASE | {"data": {"name": "photos", "n": 2, "size": None}})
    assert config.data["size"] is None


# ---------------------------------------------------------------- 5. alias bombs and size bounds
def _laughs() -> str:
    """A YAML flow list of nine levels, each nine aliases of the one before: 9**9 strings expanded."""
    levels = ["&a [" + ", ".join(['"lol"'] * 9) + "]"]
    levels += [f"&{b} [" + ", ".join([f"*{a}"] * 9) + "]" for a, b in zip("abcdefgh", "bcdefghi")]
    return "[" + ", ".join(levels) + "]"


@pytest.mark.parametrize("where, text", [
    ("name", "name: {}\n"),
    ("seed", "seed: {}\n"),
    ("data.name", "data: {{name: {}, n: 2}}\n"),
    ("models[0].options.hidden", "models: [{{name: mlp, options: {{hidden: {}}}}}]\n"),
    ("threat.input_shape", "threat: {{input_shape: {}}}\n"),
    ("defenses[0]", "defenses: [{}]\n"),
])
def test_a_billion_laughs_is_refused_without_expanding_it(tmp_path, where, text):
    body = {k: v for k, v in BASE.items() if k != where.split(".")[0].split("[")[0]}
    path = _yaml(tmp_path, yaml.safe_dump(body, sort_keys=False) + text.format(_laughs()))
    message = refused(lambda: load_audit_config(path), where, "100,000", "alias")
    assert message.startswith(where)
    cli_refuses(tmp_path, path, where, "alias")


def test_ordinary_anchors_and_aliases_still_work(tmp_path):
    text = """
name: anchors
data: &data {name: photos, n: 2, size: 16}
models:
  - &mlp {name: mlp, options: {hidden: "64"}}
  - {<<: *mlp, options: {hidden: "32"}}   # a merge key may be overridden
attacks:
  - &fc {name: fc-bias, models: [mlp]}
defenses: [&none none, *none, [*none]]
batch_sizes: &sizes [1, 2]
threat: &threat {labels_known: false}
utility: false
"""
    config = load_audit_config(_yaml(tmp_path, text))
    assert config.models[0].options == {"hidden": "64"} and len(config.defenses) == 3
    assert [m.name for m in config.models] == ["mlp", "mlp"] and config.models[1].options == {"hidden": "32"}
    assert config.batch_sizes == (1, 2)


@pytest.mark.parametrize("text, needles", [
    ("name: &a [*a]\n", ["name[0]", "refers to itself"]),
    ("threat: &t {input_shape: *t}\n", ["threat.input_shape", "refers to itself"]),
    ("name: " + "[" * 200 + "]" * 200 + "\n", ["name[0][0]", "nested more than 32"]),
    ("threat: {input_shape: &d " + "[" * 20 + "]" * 20 + "}\nname: [[[[[[[[[[[[[[[[*d]]]]]]]]]]]]]]]]\n",
     ["name[0]", "nested more than 32"]),
    ("name: " + "[" * 5000 + "]" * 5000 + "\n", ["does not parse", "column", "nesting"]),
])
def test_recursive_and_deeply_nested_values_are_refused(tmp_path, text, needles):
    body = yaml.safe_dump({k: v for k, v in BASE.items() if k != "name"}, sort_keys=False)
    path = _yaml(tmp_path, body + text)
    refused(lambda: load_audit_config(path), *needles)


def test_a_deeply_nested_toml_value_is_refused(tmp_path):
    path = tmp_path / "audit.toml"
    path.write_text('models = ["mlp"]\nattacks = ["fc-bias"]\nname = ' + "[" * 5000 + "]" * 5000 + "\n")
    refused(lambda: load_audit_config(path), "audit.toml", "nested")


def test_a_file_over_one_mib_is_refused_before_it_is_parsed(tmp_path):
    path = _yaml(tmp_path, "#" * (1024 * 1024) + "\n")
    refused(lambda: load_audit_config(path), "audit.yaml", "1,048,577 bytes", "1 MiB")


def test_too_many_values_and_too_much_text_are_refused(tmp_path):
    many = yaml.safe_dump(BASE, sort_keys=False) + "defenses: [" + ", ".join(["none"] * 100_001) + "]\n"
    refused(lambda: load_audit_config(_yaml(tmp_path, many)), "100,000")
    long = "x" * 1000
    text = (yaml.safe_dump({k: v for k, v in BASE.items() if k != "name"}, sort_keys=False)
            + f"defenses: [&s {long}" + ", *s" * 1500 + "]\n")
    refused(lambda: load_audit_config(_yaml(tmp_path, text, "long.yaml")), "characters")


# ---------------------------------------------------------------- 6. client settings
@pytest.mark.parametrize("client, needles", [
    ({"lr": -1}, ["client: lr", "-1"]),
    ({"lr": 0}, ["client: lr"]),
    ({"lr": float("nan")}, ["lr", "nan"]),
    ({"lr": float("inf")}, ["client: lr", "inf"]),
    ({"lr": "0.1"}, ["client: lr", "'0.1'"]),
    ({"lr": True}, ["client: lr"]),
    ({"local_steps": -2}, ["client: local_steps", "-2"]),
    ({"local_steps": 10**6}, ["client: local_steps", "100000"]),
    ({"local_steps": 2, "epochs": 1, "protocol": "fedavg"}, ["client", "local_steps", "epochs"]),
    ({"epochs": 0}, ["client: epochs"]),
    ({"local_batch_size": 1.5}, ["client: local_batch_size", "1.5"]),
    ({"protocol": "fedsgdd"}, ["client: protocol must be", "'fedsgdd'"]),
    ({"protocol": ["fedsgd"]}, ["client: protocol"]),
    ({"share_labels": "yes"}, ["client: share_labels", "true or false"]),
    ({"extra": [1]}, ["client: extra", "mapping"]),
    ({"colour": 1}, ["client: unknown key 'colour'"]),
    ({"batch_size": 4}, ["client: batch_size", "batch_sizes"]),
    ({"seed": 3}, ["client: seed", "seed"]),
])
def test_client_settings_are_checked_up_front(tmp_path, client, needles):
    mapping_refused({"client": client}, *needles)
    if not any(isinstance(v, float) and not math.isfinite(v) for v in client.values()):
        cli_refuses(tmp_path, _yaml(tmp_path, {"client": client}), *needles)


@pytest.mark.parametrize("fields, needles", [
    ({"lr": -1}, ["lr must be a finite number > 0", "-1"]),
    ({"batch_size": 0}, ["batch_size must be an integer in 1.."]),
    ({"batch_size": "2"}, ["batch_size"]),
    ({"seed": -1}, ["seed"]),
    ({"seed": 2**63}, ["seed"]),
    ({"share_labels": 1}, ["share_labels"]),
    ({"protocol": None}, ["protocol"]),
    ({"local_steps": True}, ["local_steps"]),
    ({"epochs": 10**7}, ["epochs"]),
    ({"extra": {1: 2}}, ["extra", "string"]),
])
def test_client_setup_validates_every_field(fields, needles):
    refused(lambda: ClientSetup(**fields), *needles)


def test_client_setup_valid_uses_keep_working():
    assert ClientSetup().protocol == "fedsgd"
    assert ClientSetup(protocol="fedavg").local_steps == 1
    setup = ClientSetup(protocol="fedavg", batch_size=4, lr=0.05, local_steps=3, local_batch_size=2,
                        share_labels=True, seed=2**63 - 1)
    assert setup.to_json()["local_steps"] == 3
    assert ClientSetup(protocol="fedavg", epochs=2).local_steps is None
    from dataclasses import replace

    assert replace(setup, local_steps=None, epochs=2).epochs == 2


def test_utility_overrides_of_the_client_are_checked(tmp_path):
    change = {"client": {"protocol": "fedavg", "local_steps": 2}, "utility": {"lr": -1.0}}
    mapping_refused(change, "utility: lr")
    change = {"client": {"protocol": "fedavg", "epochs": 2}, "utility": {"local_steps": 3}}
    mapping_refused(change, "utility", "local_steps", "epochs")


# ---------------------------------------------------------------- 7. parse errors in one line
@pytest.mark.parametrize("name, text, needles", [
    ("audit.yaml", "models: [lenet\n", ["audit.yaml", "does not parse", "line 2, column 1", "expected"]),
    ("audit.yaml", "models: [mlp]\nattacks: a: b\n", ["line 2, column", "mapping values"]),
    ("audit.yml", "name: \x07\n", ["audit.yml", "line 1, column 7", "#x0007"]),
    ("audit.yaml", "models: [mlp]\nmodels: [lenet]\n", ["line 2, column 1", "duplicate key 'models'"]),
    ("audit.yaml", "a: 1\n---\nb: 2\n", ["audit.yaml", "does not parse", "single document"]),
    ("audit.yaml", "name: !!python/object/apply:os.system ['echo pwned']\n", ["does not parse", "constructor"]),
    ("audit.yaml", "seed: " + "9" * 5000 + "\n", ["line 1, column 7", "too many digits"]),
    ("audit.toml", "models = [\"mlp\",\n", ["audit.toml", "does not parse", "end of file"]),
    ("audit.toml", "models = [\"mlp\"]\nattacks = \n", ["audit.toml", "line 2, column 11", "Invalid value"]),
    ("audit.toml", "seed = 1\nseed = 2\n", ["audit.toml", "line 2, column", "overwrite"]),
    ("audit.toml", "seed = " + "9" * 5000 + "\n", ["audit.toml", "does not parse", "too many digits"]),
])
def test_parse_errors_are_one_line_with_line_and_column(tmp_path, name, text, needles):
    path = _yaml(tmp_path, text, name)
    refused(lambda: load_audit_config(path), *needles)
    cli_refuses(tmp_path, path, "does not parse")


@pytest.mark.parametrize("name, text, needles", [
    ("audit.yaml", "name: 2024-01-01\n", ["name: a date is not a config value"]),
    ("audit.yaml", "name: !!binary aGVsbG8=\n", ["name: a bytes is not a config value"]),
    ("audit.yaml", "name: !!set {a, b}\n", ["name: a set is not a config value"]),
    ("audit.yaml", "name: .nan\n", ["name: nan"]),
    ("audit.toml", "name = 1979-05-27T07:32:00Z\n", ["name: a datetime is not a config value"]),
    ("audit.toml", "seed = nan\n", ["seed: nan"]),
    ("audit.toml", "seed = inf\n", ["seed: must be an integer", "inf"]),
])
def test_values_that_are_not_plain_data_are_refused(tmp_path, name, text, needles):
    body = {k: v for k, v in BASE.items() if k not in ("name", "utility")}
    head = "".join(f"{k} = {v!r}\n".replace("'", '"') for k, v in body.items() if k != "data")
    if name.endswith(".toml"):
        content = text + head + '[data]\nname = "photos"\nn = 2\nsize = 16\n'
    else:
        content = yaml.safe_dump(body, sort_keys=False) + text
    refused(lambda: load_audit_config(_yaml(tmp_path, content, name)), *needles)


def test_yaml_never_runs_code(tmp_path):
    marker = tmp_path / "pwned"
    path = _yaml(tmp_path, f"name: !!python/object/apply:os.system ['touch {marker}']\nmodels: [mlp]\n")
    refused(lambda: load_audit_config(path), "does not parse")
    assert not marker.exists()


# ---------------------------------------------------------------- the file itself
def test_files_that_are_not_configs_are_refused_without_blocking(tmp_path):
    folder = tmp_path / "folder.yaml"
    folder.mkdir()
    refused(lambda: load_audit_config(folder), "folder.yaml", "not a file")
    if hasattr(os, "mkfifo"):
        fifo = tmp_path / "fifo.yaml"
        os.mkfifo(fifo)
        refused(lambda: load_audit_config(fifo), "fifo.yaml", "not a file")
    refused(lambda: load_audit_config(tmp_path / "missing.yaml"), "does not exist")
    for text in ("", "# only a comment\n", "---\n", "null\n"):
        refused(lambda: load_audit_config(_yaml(tmp_path, text, "empty.yaml")), "empty.yaml", "empty")
    refused(lambda: load_audit_config(_yaml(tmp_path, "", "empty.toml")), "empty.toml", "empty")
    refused(lambda: load_audit_config(_yaml(tmp_path, "- mlp\n- lenet\n", "list.yaml")), "mapping", "list")


# ---------------------------------------------------------------- threat, utility, batch sizes, options
@pytest.mark.parametrize("change, needles", [
    ({"threat": {"labels_known": "yes"}}, ["threat: labels_known", "true or false"]),
    ({"threat": {"bn_statistics": 1}}, ["threat: bn_statistics"]),
    ({"threat": {"input_shape": [3, 100000, 100000]}}, ["threat: input_shape", "4096"]),
    ({"threat": {"input_shape": [4096, 4096, 4096]}}, ["threat: input_shape", "values per input"]),
    ({"threat": {"input_shape": [0, 32, 32]}}, ["threat: input_shape"]),
    ({"threat": {"input_shape": "3x32x32"}}, ["threat: input_shape"]),
    ({"threat": {"input_shape": [3, 32, 32, 1, 1]}}, ["threat: input_shape"]),
    ({"threat": {"data_spec": [0.5]}}, ["threat: data_spec"]),
    ({"threat": {"data_spec": {"mean": [0.5], "std": [0]}}}, ["threat", "std"]),
    ({"threat": {"colour": 1}}, ["threat: unknown key 'colour'"]),
    ({"threat": [1]}, ["threat: expected a mapping"]),
    ({"utility": {"rounds": 10**6}}, ["utility: rounds", "100000"]),
    ({"utility": {"clients": 0}}, ["utility: clients"]),
    ({"utility": {"clients": 100001}}, ["utility: clients", "100000"]),
    ({"utility": {"size": 100000}}, ["utility: size", "4..512"]),
    ({"utility": {"data": ""}}, ["utility: data"]),
    ({"utility": {"model": "nope"}}, ["utility: model", "'nope'"]),
    ({"utility": {"model_options": [1]}}, ["utility: model_options", "mapping"]),
    ({"utility": {"model_options": {"colour": 1}}}, ["utility: model_options", "'mlp'", "colour"]),
    ({"utility": {"data": "digts"}}, ["utility: data", "'digts'", "existing path"]),
    ({"utility": {"server_lr": float("nan")}}, ["server_lr"]),
    ({"utility": {"server_lr": 10**400}}, ["utility.server_lr", "digits"]),
    ({"utility": {"test_fraction": "0.2"}}, ["utility: test_fraction"]),
    ({"utility": "yes"}, ["utility", "mapping"]),
    ({"utility": [1]}, ["utility", "mapping"]),
    ({"verdict": [1]}, ["verdict", "mapping"]),
    ({"verdict": {"recognisable_psnr": "18"}}, ["verdict: recognisable_psnr"]),
    ({"batch_sizes": [5000]}, ["batch_sizes[0]", "4096"]),
    ({"batch_sizes": ["1"]}, ["batch_sizes[0]"]),
    ({"batch_sizes": [True]}, ["batch_sizes[0]"]),
    ({"batch_sizes": 1}, ["batch_sizes", "list"]),
    ({"models": [{"name": "mlp", "options": [1, 2]}]}, ["models[0].options", "mapping"]),
    ({"models": [{"name": "mlp", "options": {1: 2}}]}, ["models[0].options", "string"]),
    ({"models": [{"name": 5}]}, ["models[0]"]),
    ({"models": {"name": "mlp"}}, ["models", "list"]),
    ({"models": "mlp"}, ["models", "list"]),
    ({"attacks": [{"name": "fc-bias", "options": "x"}]}, ["attacks[0].options", "mapping"]),
    ({"attacks": [{"name": "fc-bias", "models": "mlp"}]}, ["attacks[0].models", "list"]),
    ({"defenses": [{"name": "gaussian", "variance": 10**400}]}, ["defenses[0].variance", "digits"]),
    ({"defenses": [{"name": "gaussian", "variance": float("nan")}]}, ["defenses[0]", "nan"]),
    ({"defenses": [[]]}, []),
    ({"defenses": [{"name": "gaussian", 3: 1}]}, ["defenses[0]", "string"]),
    ({"defenses": [5]}, ["defenses[0]"]),
    ({"data": [1]}, ["data: expected a mapping"]),
    ({"data": None}, ["data: expected a mapping"]),
    ({"client": "fedavg"}, ["client: expected a mapping"]),
    ({"models": [{"name": "mlp", "options": {"hidden": float("inf")}}]}, ["models[0]"]),
])
def test_hostile_values_everywhere_are_one_line(change, needles):
    if change == {"defenses": [[]]}:
        assert AuditConfig.from_mapping(BASE | change).defenses == ((),)   # [] is "no defense"
        return
    mapping_refused(change, *needles)


def test_threat_model_validates_its_fields():
    refused(lambda: ThreatModel(labels_known="no"), "labels_known")
    refused(lambda: ThreatModel(input_shape=(3, 5000, 32)), "input_shape", "4096")
    refused(lambda: ThreatModel(input_shape=(3, 32, 10**400)), "input_shape")
    refused(lambda: ThreatModel(data_spec="cifar"), "data_spec")
    assert ThreatModel(input_shape=[3, 32, 32]).input_shape == (3, 32, 32)
    assert ThreatModel(input_shape=(3072,)).input_shape == (3072,)
    spec = ThreatModel(data_spec={"mean": [0.5], "std": [0.25]}).data_spec
    assert spec.mean == (0.5,) and spec.std == (0.25,)


def test_a_valid_threat_with_data_spec_and_shape_is_kept():
    config = AuditConfig.from_mapping(BASE | {"threat": {"labels_known": True, "input_shape": [3, 16, 16],
                                                         "data_spec": {"mean": [0.5], "std": [0.5]}}})
    assert config.threat["input_shape"] == [3, 16, 16]
    assert config.to_json()["threat"]["data_spec"] == {"mean": [0.5], "std": [0.5]}


def test_the_examples_still_load():
    from pathlib import Path

    examples = sorted((Path(__file__).parent.parent / "examples").glob("*.yaml"))
    assert examples
    for path in examples:
        load_audit_config(path)
