"""Tests of gradleak.report: reconstruction grids, curves and the HTML report."""

from __future__ import annotations

import base64
import json
import math
import os
import re
from pathlib import Path

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image

from gradleak._io import atomic_write_json
from gradleak.report import curves_figure, reconstruction_grid, render_html, write_html_report
from gradleak.report import figures as figures_module
from gradleak.report.figures import _format_psnr

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MALICIOUS = "<script>alert(1)</script>"


def _to_tensor(array: np.ndarray, size: int) -> torch.Tensor:
    """A real image resized with Pillow to size×size, as a float C,H,W tensor in [0, 1]."""
    image = Image.fromarray(array).resize((size, size), Image.Resampling.BICUBIC)
    tensor = torch.tensor(np.asarray(image), dtype=torch.float32) / 255.0
    return tensor.permute(2, 0, 1) if tensor.ndim == 3 else tensor[None]


@pytest.fixture(scope="module")
def rgb_images() -> torch.Tensor:
    photos = [skimage.data.astronaut(), skimage.data.chelsea(), skimage.data.coffee(), skimage.data.rocket()]
    return torch.stack([_to_tensor(photo, 32) for photo in photos])


@pytest.fixture(scope="module")
def rgb_reconstructions(rgb_images: torch.Tensor) -> torch.Tensor:
    noise = torch.randn(rgb_images.shape, generator=torch.Generator().manual_seed(0))
    return rgb_images + 0.05 * noise  # leaves [0, 1] in places: the grid must clamp


def _png(path: Path) -> Image.Image:
    assert path.read_bytes().startswith(PNG_SIGNATURE)
    with Image.open(path) as image:
        image.load()
        assert image.format == "PNG"
        return image.copy()


def _capture_figures(monkeypatch: pytest.MonkeyPatch) -> list:
    """Record the matplotlib figures the report functions save, still writing them."""
    captured = []
    real_save = figures_module.save_figure

    def spy(figure, path, **kwargs):
        captured.append(figure)
        return real_save(figure, path, **kwargs)

    monkeypatch.setattr(figures_module, "save_figure", spy)
    return captured


# --- reconstruction grid --------------------------------------------------------------


def test_grid_writes_png_and_originals_add_a_row(tmp_path, rgb_images, rgb_reconstructions):
    alone = reconstruction_grid(rgb_reconstructions, tmp_path / "alone.png", psnr=[31.2, 25.0, 20.0, 18.0])
    paired = reconstruction_grid(
        rgb_reconstructions, tmp_path / "paired.png", originals=rgb_images, psnr=[31.2, math.inf, None, "inf"]
    )
    assert alone == tmp_path / "alone.png"
    image_alone, image_paired = _png(alone), _png(paired)
    assert image_alone.width >= 4 * 32 and image_alone.height >= 32
    assert image_paired.width == image_alone.width
    assert image_paired.height > 1.6 * image_alone.height
    assert not list(tmp_path.glob(".*.tmp"))


def test_grid_wraps_into_more_rows(tmp_path, rgb_images, rgb_reconstructions):
    ten_recon = torch.cat([rgb_reconstructions] * 3)[:10]
    ten_orig = torch.cat([rgb_images] * 3)[:10]
    one_row = _png(reconstruction_grid(ten_recon[:4], tmp_path / "four.png", originals=ten_orig[:4], max_columns=4))
    wrapped = _png(reconstruction_grid(ten_recon, tmp_path / "ten.png", originals=ten_orig, max_columns=4))
    assert wrapped.width == one_row.width
    assert wrapped.height > 2.5 * one_row.height  # three row pairs instead of one


def test_grid_grayscale_is_gray_and_rgb_is_not(tmp_path, rgb_reconstructions):
    camera = _to_tensor(skimage.data.camera(), 25)[None]
    faces = torch.cat([camera, camera.flip(-1)])
    gray = np.asarray(_png(reconstruction_grid(faces, tmp_path / "gray.png", originals=faces, psnr=[40.0, 12.3])).convert("RGB"))
    assert np.array_equal(gray[..., 0], gray[..., 1]) and np.array_equal(gray[..., 1], gray[..., 2])
    assert len(np.unique(gray[..., 0])) > 20  # the photo is there, not a blank figure
    color = np.asarray(_png(reconstruction_grid(rgb_reconstructions, tmp_path / "rgb.png")).convert("RGB"))
    assert not np.array_equal(color[..., 0], color[..., 2])


def test_small_images_are_not_blurred(tmp_path):
    # A 8×8 checkerboard of two gray levels: nearest-neighbour display keeps exactly two
    # levels inside the image; any smoothing would add many in-between values at each edge.
    board = torch.full((1, 1, 8, 8), 0.25)
    board[..., ::2, ::2] = 0.75
    board[..., 1::2, 1::2] = 0.75
    pixels = np.asarray(_png(reconstruction_grid(board, tmp_path / "board.png")).convert("L")).astype(int)
    dark, light = int(round(0.25 * 255)), int(round(0.75 * 255))
    on_levels = np.sum((np.abs(pixels - dark) <= 1) | (np.abs(pixels - light) <= 1))
    in_between = np.sum((pixels > dark + 8) & (pixels < light - 8))
    assert on_levels > 64 * 20  # each board pixel is drawn large
    assert in_between < 0.03 * on_levels  # only the label's anti-aliased text


def test_psnr_labels_and_input_checks(tmp_path, rgb_images, rgb_reconstructions):
    assert _format_psnr(31.24) == "31.2 dB"
    assert _format_psnr(math.inf) == "∞ dB"
    assert _format_psnr("inf") == "∞ dB"
    assert _format_psnr(torch.tensor(18.06)) == "18.1 dB"
    assert _format_psnr(None) is None
    with pytest.raises(ValueError, match="originals"):
        reconstruction_grid(rgb_reconstructions, tmp_path / "x.png", originals=rgb_images[:2])
    with pytest.raises(ValueError, match="psnr"):
        reconstruction_grid(rgb_reconstructions, tmp_path / "x.png", psnr=[1.0])
    with pytest.raises(ValueError, match="channels"):
        reconstruction_grid(torch.zeros(1, 2, 8, 8), tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_grid_write_is_atomic(tmp_path, monkeypatch, rgb_reconstructions):
    target = tmp_path / "grid.png"
    target.write_bytes(b"previous")

    def failing_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        reconstruction_grid(rgb_reconstructions, target)
    assert target.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["grid.png"]


# --- curves ---------------------------------------------------------------------------


def test_curves_log_scale_single_point_and_sparse_x(tmp_path, monkeypatch):
    captured = _capture_figures(monkeypatch)
    steps = np.arange(300)
    history = {
        "loss": (10.0 * np.exp(-steps / 30.0)).tolist(),  # five decades: log axis
        "psnr": {"x": [0, 50, 100, 150, 200, 250], "y": [8.0, 12.5, 17.0, 20.0, 22.0, "inf"]},
        "unit_deviation": [0.31],
        "signed": np.sin(steps / 20.0).tolist(),
    }
    path = curves_figure(history, tmp_path / "curves.png", title="fc-bias")
    image = _png(path)
    assert image.width > 600 and image.height > 250
    axes = {ax.get_title().split(" (")[0]: ax for ax in captured[0].axes if ax.get_visible()}
    assert set(axes) == set(history)
    assert axes["loss"].get_yscale() == "log"
    assert axes["psnr"].get_yscale() == "linear" and axes["signed"].get_yscale() == "linear"
    assert list(axes["psnr"].lines[0].get_xdata()) == [0, 50, 100, 150, 200, 250]
    point = axes["unit_deviation"].lines[0]
    assert point.get_marker() == "o" and len(point.get_xdata()) == 1
    assert axes["loss"].get_xlabel() == "iteration"


def test_curves_legend_names_runs_below_the_axes_not_over_the_curves(tmp_path, monkeypatch):
    captured = _capture_figures(monkeypatch)
    steps = np.arange(150)
    history = {f"unit_deviation[{k}]": (1.2 + 0.05 * k + 0.01 * np.sin(steps / (3.0 + k))).tolist() for k in range(8)}
    curves_figure(history, tmp_path / "curves.png")
    figure = captured[0]
    figure.canvas.draw()
    (ax,) = [a for a in figure.axes if a.get_visible()]
    legend = ax.get_legend()
    assert [t.get_text() for t in legend.get_texts()] == [f"[{k}]" for k in range(8)]
    renderer = figure.canvas.get_renderer()
    box, plot = legend.get_window_extent(renderer), ax.get_window_extent(renderer)
    assert box.y1 <= plot.y0, "the legend overlaps the plotting area"
    assert box.y0 >= 0 and box.x0 >= 0 and box.x1 <= figure.bbox.x1, "the legend is cut off by the figure's edge"


def test_curves_empty_and_invalid(tmp_path, monkeypatch):
    captured = _capture_figures(monkeypatch)
    _png(curves_figure({}, tmp_path / "empty.png"))
    texts = [text.get_text() for text in captured[0].texts]
    assert "no curve recorded" in texts
    with pytest.raises(ValueError, match="x values"):
        curves_figure({"psnr": {"x": [0, 10], "y": [1.0]}}, tmp_path / "bad.png")
    assert not (tmp_path / "bad.png").exists()


# --- HTML report ----------------------------------------------------------------------


@pytest.fixture()
def run_dir(tmp_path, rgb_images, rgb_reconstructions) -> Path:
    run = tmp_path / "run"
    reconstruction_grid(rgb_reconstructions, run / "grid.png", originals=rgb_images, psnr=[31.0, math.inf, 25.0, 20.0])
    curves_figure({"loss": [1.0, 0.1, 0.01, 0.001]}, run / "curves.png")
    atomic_write_json(
        run / "config.json",
        {
            "attack": {"name": "fc-bias", "options": {"restarts": 2}},
            "model": {"name": "mlp", "width": 1024},
            "data": MALICIOUS,
            "threat": {"labels_shared": True},
        },
    )
    atomic_write_json(
        run / "metrics.json",
        {
            "attack": "fc-bias",
            "summary": {"n_images": 4, "psnr_mean": 31.2, "psnr_std": 2.1, "ssim_mean": 0.9,
                        "mse_mean": 1e-4, "lpips_mean": None, "label_accuracy": 1.0},
            "per_image": [
                {"index": 0, "matched_to": 3, "psnr": 31.0, "ssim": 0.95, "mse": 1e-4, "lpips": None},
                {"index": 1, "matched_to": 0, "psnr": math.inf, "ssim": 1.0, "mse": 0.0, "lpips": None},
            ],
            "lpips": {"available": False, "reason": "AlexNet weights not found in /models"},
            "notes": ["condition held: bias gradient non-zero", f"warning {MALICIOUS}"],
        },
    )
    return run


def test_html_shows_summary_images_and_tables(run_dir):
    page = render_html(run_dir)
    assert page.startswith("<!DOCTYPE html>")
    assert "<title>Gradient leakage report: fc-bias</title>" in page
    for expected in ("31.20 ± 2.10 dB", "0.9000", "1.000e-04", "100.0 %",
                     "unavailable: AlexNet weights not found in /models",
                     "<code>model.width</code>", "<code>attack.options.restarts</code>",
                     "condition held: bias gradient non-zero"):
        assert expected in page, expected
    uris = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(uris) == 2
    assert all(base64.b64decode(uri).startswith(PNG_SIGNATURE) for uri in uris)
    per_image = page[page.index("<h2>Per image</h2>"):page.index("<h2>Notes</h2>")]
    assert '<td class="num">∞</td>' in per_image and "inf" not in per_image
    assert "LPIPS" not in per_image  # a column with no value at all is dropped


def test_html_escapes_untrusted_strings_and_makes_no_requests(run_dir):
    metrics = json.loads((run_dir / "metrics.json").read_text())
    metrics["attack"] = MALICIOUS
    metrics["summary"]["psnr_mean"] = '"><img src=x onerror=alert(1)>'
    atomic_write_json(run_dir / "metrics.json", metrics)
    page = render_html(run_dir)
    assert "<script" not in page.lower()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "<img src=x" not in page
    assert re.findall(r'(?:src|href)="(?!data:image/png;base64,)', page) == []
    assert "http://" not in page and "https://" not in page


def test_html_lenient_on_missing_files_and_keys(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    page = render_html(empty)
    assert "data:image" not in page
    assert "grid.png not found" in page and "curves.png not found" in page
    assert "metrics.json not found" in page
    assert page.count("n/a") >= 6  # every summary value

    partial = tmp_path / "partial"
    atomic_write_json(partial / "metrics.json",
                      {"summary": {"psnr_mean": "inf", "lpips_mean": 0.0312}, "notes": "only one"})
    (partial / "config.json").write_text("{not json")
    page = render_html(partial)
    assert "∞ dB" in page and "0.0312" in page and "<li>only one</li>" in page
    assert "config.json could not be read" in page
    assert "No per-image metrics" in page
    with pytest.raises(NotADirectoryError):
        render_html(tmp_path / "missing")


def test_write_html_report_and_atomicity(run_dir, monkeypatch):
    path = write_html_report(run_dir)
    assert path == run_dir / "report.html"
    first = path.read_text(encoding="utf-8")
    assert first == render_html(run_dir)

    atomic_write_json(run_dir / "metrics.json", {"attack": "dlg"})

    def failing_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        write_html_report(run_dir)
    assert path.read_text(encoding="utf-8") == first  # the old report is intact
    assert not [p for p in run_dir.iterdir() if p.name.endswith(".tmp")]

    path.unlink()
    with pytest.raises(OSError):
        write_html_report(run_dir)
    assert not path.exists()  # no partial report either


@pytest.mark.parametrize("width", [1.7, 3.0, 6.0])
def test_figure_titles_are_wrapped_to_fit_the_figure(width):
    """A one-image grid is 1.7 inches wide: its title used to run off both edges."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from gradleak.report.figures import fit_title

    title = "inverting-gradients on 8 update(s): originals (top) and reconstructions, PSNR per image"
    figure = Figure(figsize=(width, 2))
    FigureCanvasAgg(figure)
    text = figure.suptitle(fit_title(title, width, 11), fontsize=11)
    figure.canvas.draw()
    box = text.get_window_extent()
    assert box.x0 >= 0 and box.x1 <= figure.bbox.width
    assert text.get_text().replace("\n", " ") == title


def test_a_report_never_embeds_what_a_linked_figure_points_to(run_dir, tmp_path):
    """A run folder is data: a grid.png that is a link (to a private picture, say) is not embedded."""
    private = tmp_path / "private.png"
    Image.fromarray(skimage.data.camera()).save(private)
    (run_dir / "grid.png").unlink()
    (run_dir / "grid.png").symlink_to(private)
    page = render_html(run_dir)
    assert base64.b64encode(private.read_bytes()[:300]).decode()[:200] not in page
    assert "grid.png is a symbolic link; not embedded." in page


def test_a_diverged_reconstruction_is_written_and_rebuilt(tmp_path, rgb_images):
    from gradleak.attacks.base import Reconstruction
    from gradleak.runs import rebuild_report, write_run

    images = rgb_images[:2].clone()
    images[1] = float("nan")  # an attack that diverged on the second image
    write_run(tmp_path / "run", Reconstruction(images), originals=rgb_images[:2])
    assert rebuild_report(tmp_path / "run").is_file()


def test_a_grid_of_many_images_draws_the_first_ones_and_says_so(tmp_path):
    from gradleak.report.figures import MAX_GRID_IMAGES

    images = torch.rand(MAX_GRID_IMAGES + 40, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    path = reconstruction_grid(images, tmp_path / "grid.png", title="many")
    assert _png(path).size[1] < 10_000  # 32 rows of 8, not 37


def test_large_images_are_drawn_at_full_size(tmp_path):
    """A 224-px reconstruction gets at least 224 pixels of its cell, not a shrunk thumbnail."""
    photo = _to_tensor(skimage.data.astronaut(), 224)[None]
    path = reconstruction_grid(photo, tmp_path / "grid.png", originals=photo)
    width, height = _png(path).size
    assert width >= 224 and height >= 2 * 224
