"""The end-to-end pass as a library: interrupted runs keep what they had, run folders
read back, and `import gradleak` copes with a torchvision whose compiled ops do not load."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from gradleak import FCBiasInversion, ThreatModel
from gradleak._compat import ensure_torchvision_importable
from gradleak.data.spec import DataSpec
from gradleak.models import MLP
from gradleak.pipeline import ClientSetup, attack_updates, simulate_clients
from gradleak.runs import load_run, write_run


class _InterruptedAfter(FCBiasInversion):
    """Simulates Ctrl-C arriving while the third update is being attacked."""

    calls = 0

    def _reconstruct(self, update):
        type(self).calls += 1
        if type(self).calls == 3:
            raise KeyboardInterrupt
        return super()._reconstruct(update)


def test_an_interrupted_run_keeps_what_it_had(photos, tmp_path):
    torch.manual_seed(0)
    model = MLP(3 * 32 * 32, hidden=(64,), num_classes=10)
    spec = DataSpec.from_images(photos.images)
    updates = simulate_clients(model, photos.images[:5], photos.labels[:5], ClientSetup(), spec=spec)
    result = attack_updates(_InterruptedAfter(model, ThreatModel()), updates, quiet=True)
    assert result.images.shape[0] == 2
    assert "interrupted: 2 of 5 updates attacked" in result.notes
    run = write_run(tmp_path / "run", result, originals=photos.images[:2], true_labels=photos.labels[:2])
    assert run.scores.summary["psnr_mean"] > 60
    reconstruction, tensors, metrics = load_run(tmp_path / "run")
    assert torch.equal(reconstruction.images, result.images) and torch.equal(tensors["originals"], photos.images[:2])
    assert "interrupted: 2 of 5 updates attacked" in metrics["notes"]
    assert "interrupted" in (tmp_path / "run" / "report.html").read_text()


def test_simulated_clients_split_the_data_in_order(photos):
    model = MLP(3 * 32 * 32, hidden=(8,), num_classes=10)
    updates = simulate_clients(model, photos.images[:6], photos.labels[:6], ClientSetup(batch_size=3, share_labels=True))
    assert [u.labels.tolist() for u in updates] == [[0, 1, 2], [3, 4, 5]]
    with pytest.raises(Exception, match="do not split into clients of batch_size=4"):
        simulate_clients(model, photos.images[:6], photos.labels[:6], ClientSetup(batch_size=4))


def test_compat_shim_is_a_no_op_when_torchvision_loads(monkeypatch):
    import gradleak._compat as compat

    monkeypatch.setattr(compat, "_FALLBACK_LIBRARY", None)
    monkeypatch.delitem(sys.modules, "torchvision", raising=False)
    loaded = []
    assert ensure_torchvision_importable(load_library=loaded.append) is False
    assert len(loaded) == 1 and "_C" in loaded[0]
    assert compat._FALLBACK_LIBRARY is None


@pytest.mark.slow
def test_import_gradleak_then_torchvision_models_and_metrics_in_a_fresh_interpreter():
    code = (
        "import gradleak, torchvision, torchmetrics.functional.image as f, json;"
        "m = torchvision.models.resnet18(num_classes=10);"
        "print(json.dumps({'params': sum(p.numel() for p in m.parameters()),"
        " 'patched': gradleak._compat.torchvision_patched()}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    info = json.loads(out.stdout.strip().splitlines()[-1])
    assert info["params"] == 11_181_642


@pytest.mark.slow
@pytest.mark.parametrize("dtype, floor", [(torch.float32, 60.0), (torch.float64, 100.0)], ids=["float32", "float64"])
def test_the_quick_start_job_meets_its_promise(tmp_path, dtype, floor):
    from gradleak.models import ModelSpec
    from gradleak.pipeline import demo

    result = demo(tmp_path / "demo", model=ModelSpec("mlp", dtype=str(dtype).removeprefix("torch.")), quiet=True)
    psnrs = [row["psnr"] for row in result.scores.per_image]
    assert len(psnrs) == 8 and min(psnrs) >= floor
    assert result.scores.summary["label_accuracy"] == 1.0
    html = result.report.read_text()
    assert html.count("data:image/png;base64,") == 2 and "fc-bias" in html
    metrics = json.loads((tmp_path / "demo" / "metrics.json").read_text())
    assert metrics["summary"]["n_images"] == 8
