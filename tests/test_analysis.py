"""The leakage analyser: predictions, JSON, the CLI command."""

from __future__ import annotations

import json

import torch
from typer.testing import CliRunner

from gradleak.analysis import analyze, report_table
from gradleak.cli import app
from gradleak.models import CNN6


def test_mlp_single_and_batches():
    one = analyze("mlp", (3, 32, 32), 1)
    assert one.verdict == "EXACT RECOVERY PREDICTED" and one.predicted("fc-bias").exact
    big = analyze("mlp", (3, 32, 32), 8, numeric=False)
    assert big.predicted("fc-bias").exact is False and big.predicted("qian").exact is True   # 256 >= 16 * 8
    middle = analyze("mlp", (3, 8, 8), 32, numeric=False)
    assert middle.predicted("qian").exact is None                                            # 32 <= 256 < 16 * 32
    from gradleak.models import MLP
    small = analyze(MLP(3 * 8 * 8, (4,), 10), (3, 8, 8), 8)
    assert small.predicted("qian").exact is False and "4 hidden units < batch size 8" in small.predicted("qian").reason


def test_rgap_rank_prediction_on_cnn6_variants():
    torch.manual_seed(0)
    good = analyze(CNN6(3, 1, 16, widths=(12, 24, 24, 24, 32, 32)), (3, 16, 16))
    assert good.predicted("rgap").exact and good.copa_security["measure"] is not None
    bad = analyze(CNN6(3, 1, 16, widths=(1, 24, 24, 24, 32, 32)), (3, 16, 16))
    assert bad.predicted("rgap").exact is False and "rank deficit in 'body.0'" in bad.predicted("rgap").reason
    assert bad.copa_security["secure"] is True
    assert not analyze(CNN6(3, 1, 16, widths=(12, 24, 24, 24, 32, 32)), (3, 16, 16), 2).predicted("rgap").applies


def test_non_chain_model_and_json():
    report = analyze("resnet20", (3, 32, 32), 1)
    assert report.verdict == "NO EXACT CLOSED-FORM RECOVERY"
    assert "not a chain" in report.predicted("rgap").reason
    json.dumps(report.to_json())
    assert len(report_table(report)) == 2


def test_cli_analyze_json_and_table():
    runner = CliRunner()
    result = runner.invoke(app, ["analyze", "--model", "mlp", "--input-shape", "3x16x16", "--batch-size", "4", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["batch_size"] == 4 and data["verdict"] == "EXACT RECOVERY PREDICTED"
    table = runner.invoke(app, ["analyze", "--model", "fcn3", "--input-shape", "1x28x28"])
    assert table.exit_code == 0 and "rgap" in table.output
    bad = runner.invoke(app, ["analyze", "--model", "nope", "--input-shape", "3x32x32"])
    assert bad.exit_code == 2 and "unknown model" in bad.output
