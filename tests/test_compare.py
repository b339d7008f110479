"""``gradleak compare``: run folders side by side, a table and CSV that say what each run recovered."""

from __future__ import annotations

import csv
import io

import pytest
from typer.testing import CliRunner

from gradleak.cli import app
from gradleak.compare import compare_runs
from gradleak.data.request import DataRequest
from gradleak.errors import DataError
from gradleak.pipeline import ClientSetup, attack_simulated
from gradleak.threat import ThreatModel


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    exact = attack_simulated("fc-bias", root / "exact", data=DataRequest("photos", 2, 16), model="mlp", quiet=True)
    imprint = attack_simulated("imprint", root / "imprint", data=DataRequest("faces", 32, None), model="mlp",
                               client=ClientSetup(batch_size=32), threat=ThreatModel(server="malicious"), quiet=True)
    defended = attack_simulated("fc-bias", root / "nested" / "exact", data=DataRequest("photos", 2, 16), model="mlp",
                                defenses=["gaussian:variance=1e-2"], quiet=True)
    return exact, imprint, defended


def test_the_table_says_what_each_run_recovered(runs, tmp_path):
    exact, imprint, defended = runs
    result = compare_runs([r.run_dir for r in runs], tmp_path / "cmp")
    table = list(csv.DictReader(io.StringIO((tmp_path / "cmp" / "comparison.csv").read_text())))
    assert table[1]["run"] == "imprint" and table[2]["run"] == "nested/exact"   # two folders named 'exact':
    assert table[0]["run"].endswith("/exact") and table[0]["run"] != table[2]["run"]  # told apart by their parents
    assert table[2]["defenses"] == "gaussian(variance=0.01)" and table[0]["defenses"] == "none"
    s = imprint.scores.summary
    assert (int(table[1]["n_images"]), int(table[1]["n_recovered"]), int(table[1]["n_exact"])) == (
        32, s["n_recovered"], s["n_exact"])
    assert s["n_recovered"] < 32                                     # the lost images are counted, not hidden
    assert float(table[0]["psnr_mean"]) == pytest.approx(exact.scores.summary["psnr_mean"])
    assert int(table[0]["certified_updates"]) == 2 and int(table[2]["certified_updates"]) == 0
    per_image = list(csv.DictReader(io.StringIO((tmp_path / "cmp" / "per_image.csv").read_text())))
    assert sum(1 for row in per_image if row["run"] == "imprint") == 32
    assert sum(1 for row in per_image if row["run"] == "imprint" and row["recovered"] == "False") == 32 - s["n_recovered"]
    page = result.report.read_text()
    assert "gaussian(variance=0.01)" in page and f"{s['n_recovered']} of 32" in page and "data:image/png" in page


def test_a_single_run_has_its_own_csv(runs):
    _, imprint, _ = runs
    rows = list(csv.DictReader(io.StringIO((imprint.run_dir / "per_image.csv").read_text())))
    assert len(rows) == 32 and {r["recovered"] for r in rows} == {"True", "False"}


def test_the_command_and_its_refusals(runs, tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["compare", *[str(r.run_dir) for r in runs], "--out", str(tmp_path / "c"), "-q"])
    assert result.exit_code == 0, result.output
    again = runner.invoke(app, ["compare", str(runs[0].run_dir), "--out", str(tmp_path / "c")])
    assert again.exit_code == 2 and "--overwrite" in again.stderr
    missing = runner.invoke(app, ["compare", str(tmp_path / "nope"), "--out", str(tmp_path / "d")])
    assert missing.exit_code == 2 and "is not a gradleak run folder" in missing.stderr
    assert not (tmp_path / "d").exists()
    with pytest.raises(DataError):
        compare_runs([tmp_path / "c"], tmp_path / "e")               # a comparison is not a run folder
