"""The `gradleak` command: every command runs on real data and writes what it says;
bad input gets a one-line error and no traceback."""

from __future__ import annotations

import json
import pickle

import pytest
import torch
from typer.testing import CliRunner

from gradleak.cli import app

runner = CliRunner()


def invoke(*args):
    result = runner.invoke(app, [str(a) for a in args], catch_exceptions=False)
    return result


def test_help_lists_every_command_and_each_command_has_help():
    result = invoke("--help")
    for command in ("demo", "capture", "attack", "report", "list", "audit"):
        assert command in result.output
        sub = invoke(command, "--help")
        assert sub.exit_code == 0 and "Usage" in sub.output
    for command in ("demo", "capture", "attack", "audit"):
        assert "--quiet" in invoke(command, "--help").output


def test_list_shows_models_attacks_and_data():
    out = invoke("list").output
    assert "lenet" in out and "fc-bias" in out and "faces" in out
    assert "dp-sgd" in out and "secure-aggregation" in out and "soteria" in out


def test_demo_writes_a_run_folder_with_exact_reconstructions(tmp_path):
    result = invoke("demo", "--out", tmp_path / "run", "--n", 3, "--size", 16, "--quiet")
    assert result.exit_code == 0, result.output
    run = tmp_path / "run"
    for name in ("grid.png", "curves.png", "report.html", "metrics.json", "config.json", "reconstruction.safetensors"):
        assert (run / name).is_file(), name
    assert len(list((run / "updates").glob("client-*.safetensors"))) == 3
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["summary"]["psnr_mean"] >= 60 and metrics["summary"]["label_accuracy"] == 1.0


def test_capture_then_attack_the_file_then_rebuild_the_report(tmp_path):
    update, truth, run = tmp_path / "client.safetensors", tmp_path / "truth.safetensors", tmp_path / "run"
    result = invoke("capture", "--out", update, "--truth", truth, "--data", "faces", "--start", 120, "--n", 1,
                    "--size", 25, "--model", "two-layer", "-m", "hidden=16", "--dtype", "float64", "-q")
    assert result.exit_code == 0, result.output
    result = invoke("attack", update, "--truth", truth, "--out", run, "--dtype", "float64", "-q")
    assert result.exit_code == 0, result.output
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["summary"]["psnr_mean"] >= 100
    assert metrics["summary"]["label_accuracy"] == 1.0  # a non-face, label 0, from the sign of dL/db2
    (run / "report.html").unlink()
    (run / "grid.png").unlink()
    assert invoke("report", run).exit_code == 0
    html = (run / "report.html").read_text()
    assert (run / "grid.png").is_file() and "data:image/png;base64," in html and "fc-bias" in html


def test_attack_on_simulated_batches_reports_the_failed_condition(tmp_path):
    result = runner.invoke(app, ["attack", "-c", "batch_size=2", "--n", "2", "--out", str(tmp_path / "r"), "-q"])
    assert result.exit_code == 2
    assert result.output.count("\n") <= 2 and "Traceback" not in result.output
    assert "batch of 2" in result.output


@pytest.mark.parametrize("args, needle", [
    (["demo", "--n", "0"], "--n"),
    (["demo", "--dtype", "float16"], "--dtype"),
    (["demo", "--data", "nowhere"], "'nowhere'"),
    (["demo", "--model", "resnet9000"], "unknown model 'resnet9000'"),
    (["attack", "--option", "novalue"], "key=value"),
    (["attack", "--option", "bogus=1", "--n", "1"], "bad option"),
    (["report", "/nonexistent/run"], "not a gradleak run folder"),
])
def test_bad_values_get_one_clear_line(tmp_path, args, needle):
    result = runner.invoke(app, args + (["--out", str(tmp_path / "o")] if args[0] in ("demo", "attack") else []))
    assert result.exit_code == 2, result.output
    assert needle in result.output and "Traceback" not in result.output
    error_lines = [line for line in result.output.splitlines() if "rror" in line]
    assert len(error_lines) == 1


def test_attacking_a_pickle_is_refused(tmp_path):
    evil = tmp_path / "update.safetensors"
    evil.write_bytes(pickle.dumps({"fc1.weight": torch.zeros(2)}))
    result = runner.invoke(app, ["attack", str(evil), "--out", str(tmp_path / "r")])
    assert result.exit_code == 2 and "never unpickles" in result.output
    assert not (tmp_path / "r").exists()


def test_optimisation_attack_on_an_update_file_records_psnr_curves(tmp_path):
    update, truth, run = tmp_path / "u.safetensors", tmp_path / "t.safetensors", tmp_path / "run"
    assert invoke("capture", "--out", update, "--truth", truth, "--model", "lenet", "--start", 1, "-q").exit_code == 0
    result = invoke("attack", update, "--truth", truth, "--attack", "inverting-gradients", "-o", "iterations=60",
                    "-o", "record_every=20", "--out", run, "-q")
    assert result.exit_code == 0, result.output
    history = json.loads((run / "history.json").read_text())
    assert history["loss"]["x"] == [0, 20, 40, 59] and len(history["psnr"]["y"]) == 4
    assert history["psnr"]["y"][-1] > history["psnr"]["y"][0]
    config = json.loads((run / "config.json").read_text())
    assert config["attack_options"]["iterations"] == 60 and config["attack_options"]["objective"] == "cosine"


def test_study_architectures_on_lenet_writes_plot_strip_and_table(tmp_path):
    result = invoke("study", "architectures", "--model", "lenet", "--steps", 3, "--out", tmp_path / "s", "-q")
    assert result.exit_code == 0, result.output
    table = json.loads((tmp_path / "s" / "table.json").read_text())
    assert [row["model"] for row in table] == ["lenet"] and len(table[0]["mse_curve"]) == 3
    assert table[0]["mse_final"] < table[0]["mse_start"]
    for name in ("mse.png", "strip.png", "report.html"):
        assert (tmp_path / "s" / name).stat().st_size > 1000


def test_fedavg_attack_on_simulated_fedavg_clients(tmp_path):
    result = invoke("attack", "--attack", "fedavg", "-c", "protocol=fedavg", "-c", "local_steps=2", "-c", "batch_size=2",
                    "--n", 2, "--model", "lenet", "-o", "iterations=20", "--out", tmp_path / "r", "-q")
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "r" / "config.json").read_text())
    assert config["client"]["protocol"] == "fedavg" and config["client"]["local_steps"] == 2
    assert json.loads((tmp_path / "r" / "metrics.json").read_text())["summary"]["n_images"] == 2


def test_attack_with_defenses_records_them_and_their_effect(tmp_path):
    clipped = invoke("attack", "--model", "mlp", "--n", 2, "--size", 16, "--defense", "clipping:max_norm=0.1",
                     "--out", tmp_path / "clipped", "--quiet")
    assert clipped.exit_code == 0, clipped.output
    config = json.loads((tmp_path / "clipped" / "config.json").read_text())
    assert config["defenses"] == [{"name": "clipping", "max_norm": 0.1}]
    metrics = json.loads((tmp_path / "clipped" / "metrics.json").read_text())
    assert metrics["summary"]["psnr_mean"] >= 60  # clipping keeps the direction: the exact attack still works
    private = invoke("attack", "--attack", "inverting-gradients", "--model", "lenet", "--n", 2, "--size", 16,
                     "-o", "iterations=20", "--defense", "dp-sgd:epsilon=8", "--out", tmp_path / "dp", "--quiet")
    assert private.exit_code == 0, private.output
    privacy = json.loads((tmp_path / "dp" / "config.json").read_text())["privacy"]
    assert len(privacy) == 2 and privacy[0]["epsilon"] == pytest.approx(8.0, abs=0.05)


@pytest.mark.parametrize("args, needle", [
    (("--defense", "gausian"), "unknown defense 'gausian'"),
    (("--defense", "gaussian:variance=abc"), "variance must be a finite number"),
    (("--defense", "secure-aggregation:clients=3"), "do not split into groups of clients=3"),
])
def test_bad_defenses_get_one_clear_line(tmp_path, args, needle):
    result = invoke("attack", "--model", "mlp", "--n", 2, "--size", 16, *args, "--out", tmp_path / "r", "--quiet")
    assert result.exit_code == 2 and needle in result.output and "Traceback" not in result.output


def test_attack_start_picks_the_images_and_is_refused_for_an_update_file(tmp_path):
    """--start N attacks the built-in set's images N.. (e.g. a trained model's held-out ones)."""
    from safetensors.torch import load_file

    from gradleak.data import load_builtin

    result = invoke("attack", "-a", "fc-bias", "--data", "digits", "--start", 5, "--n", 1, "--model", "mlp",
                    "--out", tmp_path / "r", "-q")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "r" / "config.json").read_text())["data"]["start"] == 5
    stored = load_file(str(tmp_path / "r" / "reconstruction.safetensors"))
    truth = next(v for k, v in stored.items() if "orig" in k or "truth" in k)
    digits = load_builtin("digits", size=32, n=6)
    assert torch.allclose(truth[0], digits.images[5], atol=1e-6)
    assert not torch.allclose(truth[0], digits.images[0], atol=1e-2)
    update = tmp_path / "u.safetensors"
    assert invoke("capture", "--out", update, "--model", "mlp", "-q").exit_code == 0
    refused = runner.invoke(app, ["attack", str(update), "--start", "3", "--out", str(tmp_path / "x")])
    assert refused.exit_code == 2 and "--start apply to simulated clients" in refused.output
