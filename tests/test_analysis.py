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


def test_a_malicious_server_is_predicted_and_the_prediction_holds(tmp_path):
    """The analyser's malicious-server rows: imprint applies to any model, its expected count
    B (1 - 1/N)^(B-1) is what a real imprint attack on 32 digits recovers exactly (within 4)."""
    import math

    import gradleak as gl
    from gradleak.pipeline import DataRequest, attack_simulated

    report = analyze("lenet", (1, 16, 16), batch_size=32)
    imprint = next(v for v in report.malicious if v.attack == "imprint")
    trap = next(v for v in report.malicious if v.attack == "trap-weights")
    assert imprint.applies and imprint.exact and not trap.applies and trap.exact is False
    assert "a malicious server: exact recovery by imprint" in report.summary
    assert report.summary.startswith("an honest-but-curious server: no exact closed-form recovery")
    assert "malicious" in report.to_json() and analyze("mlp", (1, 16, 16), 4).malicious[1].applies
    expected = 32 * (1 - 1 / 128) ** 31
    assert f"about {expected:.1f} of 32" in imprint.reason
    run = attack_simulated("imprint", tmp_path / "imprint", data=DataRequest("digits", 32, 16, start=1700),
                           model="lenet", client=gl.ClientSetup(batch_size=32),
                           threat=gl.ThreatModel(server="malicious"), quiet=True)
    exact = sum(1 for r in run.scores.per_image if r["psnr"] is not None and r["psnr"] >= 60)
    assert math.fabs(exact - expected) <= 4, (exact, expected)
