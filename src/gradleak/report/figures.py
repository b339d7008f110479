"""Figures of a run: the reconstruction grid and the optimisation curves.

Both functions build a :class:`matplotlib.figure.Figure` directly on the Agg canvas (no
pyplot, no global state) and write it through :func:`gradleak._io.save_figure`, so a PNG
is either complete or absent.
"""

from __future__ import annotations

import math
import os
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from gradleak._io import save_figure
from gradleak.errors import ConfigError

__all__ = ["reconstruction_grid", "curves_figure", "share_notes"]

_CELL_INCHES = 1.35  # width and height of one image cell (larger for images above 162 px: shown at full size)
_DPI = 120
_LOG_DECADES = 2.0  # a positive series spanning more than this many decades is drawn on a log axis


def _as_float(value: Any) -> float | None:
    """A number from a float, tensor, numpy scalar or the strings ``"inf"``/``"nan"``; else None."""
    if value is None or isinstance(value, bool):
        return None
    try:
        if hasattr(value, "item"):  # tensors and numpy scalars
            value = value.item()
        return float(value)
    except (TypeError, ValueError, RuntimeError):
        return None


def _images_to_numpy(images: Any, name: str) -> np.ndarray:
    """Turn a tensor or array (N,C,H,W or C,H,W) into a clamped float numpy array N,C,H,W."""
    if hasattr(images, "detach"):  # torch.Tensor, without importing torch here
        images = images.detach().to("cpu").float().numpy()
    array = np.asarray(images, dtype=np.float64)
    if array.ndim == 3:
        array = array[None]
    if array.ndim != 4:
        raise ConfigError(f"{name} must have shape N,C,H,W; got shape {tuple(array.shape)}")
    if array.shape[1] not in (1, 3):
        raise ConfigError(f"{name} must have 1 (gray) or 3 (RGB) channels; got {array.shape[1]}")
    return np.clip(np.nan_to_num(array, nan=0.0, posinf=1.0, neginf=0.0), 0.0, 1.0)


def _format_psnr(value: Any) -> str | None:
    """``"31.2 dB"``, ``"∞ dB"`` for a perfect match, None when there is no value; a label such
    as ``"not recovered"`` (any other text) is shown as it is."""
    if isinstance(value, str) and value not in ("inf", "-inf", "nan"):
        return value
    number = _as_float(value)
    if number is None:
        return None
    if math.isnan(number):
        return "n/a"
    if math.isinf(number):
        return "∞ dB" if number > 0 else "−∞ dB"
    return f"{number:.1f} dB"


def _new_figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height), dpi=_DPI)
    FigureCanvasAgg(figure)
    return figure


def fit_title(title: str, width_inches: float, fontsize: float) -> str:
    """``title`` wrapped into lines that fit a figure ``width_inches`` wide at ``fontsize`` points
    (about 0.55 em per character in the default sans-serif). Every figure title goes through it."""
    return textwrap.fill(title, width=max(12, int(width_inches * 72 / (0.55 * fontsize))))


def _message_figure(text: str, path: str | os.PathLike, title: str | None) -> Path:
    """A small figure that only says ``text`` (used when there is nothing to draw)."""
    figure = _new_figure(4.0, 2.0)
    if title:
        figure.suptitle(fit_title(title, 4.0, 12))
    figure.text(0.5, 0.5, text, ha="center", va="center", fontsize=12, color="0.35")
    return save_figure(figure, path)


def _show_image(ax: Any, image: np.ndarray) -> None:
    """Draw one C,H,W image in an axis without ticks, with nearest neighbours: its cell is at
    least as many pixels as the image (small images are enlarged with sharp pixels, as the
    attack produced them; large ones are shown at full size)."""
    interpolation = "nearest"
    if image.shape[0] == 1:
        ax.imshow(image[0], cmap="gray", vmin=0.0, vmax=1.0, interpolation=interpolation)
    else:
        ax.imshow(np.transpose(image, (1, 2, 0)), interpolation=interpolation)
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)


def share_notes(shares: Sequence[float] | None, n: int, name: str = "share") -> list[str | None] | None:
    """``share 99.9 %`` under each image: its share of the re-simulated update (:mod:`gradleak.shares`),
    truth-free; below 0.1 % in powers of ten (``share 3e-06``); ``name="part"``: its part of a fitted
    mixture (``mixture="fitted"``). None when no values are known for the ``n`` images."""
    if shares is None or len(shares) != n:
        return None
    return [f"{name} {100 * v:.3g} %" if v >= 1e-3 else f"{name} {v:.0e}" for v in shares]


MAX_GRID_IMAGES = 256  # images drawn in one grid (32 row pairs of 8); the rest are in the tables


def _grid_inputs(reconstructions: Any, originals: Any | None, psnr: Sequence[Any] | None,
                 notes: Sequence[str | None] | None = None):
    """The grid's images as arrays and their titles (PSNR, then the note), refused where counts or channels differ."""
    recon = _images_to_numpy(reconstructions, "reconstructions")
    orig = None if originals is None else _images_to_numpy(originals, "originals")
    n = recon.shape[0]
    if orig is not None and orig.shape[0] != n:
        raise ConfigError(f"originals has {orig.shape[0]} images but reconstructions has {n}")
    if orig is not None and orig.shape[1] != recon.shape[1]:
        raise ConfigError(
            f"originals has {orig.shape[1]} channels but reconstructions has {recon.shape[1]}"
        )
    labels = [None] * n if psnr is None else [_format_psnr(v) for v in psnr]
    if len(labels) != n:
        raise ConfigError(f"psnr has {len(labels)} values but there are {n} reconstructions")
    if notes is not None:
        if len(notes) != n:
            raise ConfigError(f"notes has {len(notes)} values but there are {n} reconstructions")
        labels = ["\n".join(t for t in (label, note) if t) or None for label, note in zip(labels, notes)]
    return recon, orig, labels


def reconstruction_grid(
    reconstructions: Any,
    path: str | os.PathLike,
    *,
    originals: Any | None = None,
    psnr: Sequence[Any] | None = None,
    notes: Sequence[str | None] | None = None,
    title: str | None = None,
    max_columns: int = 8,
) -> Path:
    """Write a PNG grid of reconstructed images, under their originals when given.

    Args:
        reconstructions: float images N,C,H,W in [0, 1] (C = 1 gray, C = 3 RGB); values are
            clamped for display.
        path: where the PNG goes (written atomically).
        originals: the true images, in the same order as ``reconstructions`` (i.e. already
            matched); shown in an ``original`` row above each ``reconstruction`` row.
        psnr: one PSNR per reconstruction (float, ``"inf"`` or None), shown as its title.
        notes: one short line per reconstruction shown under its PSNR (e.g. its share of the
            update, :func:`share_notes`), or None.
        title: a title over the whole figure.
        max_columns: images per row; more images wrap into further row pairs. At most
            :data:`MAX_GRID_IMAGES` images are drawn (the title says so when there are more).

    Returns:
        The path of the written PNG.
    """
    if max_columns < 1:
        raise ConfigError(f"max_columns must be >= 1; got {max_columns}")
    recon, orig, labels = _grid_inputs(reconstructions, originals, psnr, notes)
    n = recon.shape[0]
    if n == 0:
        return _message_figure("no reconstruction", path, title)
    if n > MAX_GRID_IMAGES:  # matplotlib cannot draw a figure thousands of cells tall; the page says so
        title = f"{title or ''} (the first {MAX_GRID_IMAGES} of {n})".strip()
        recon, labels, n = recon[:MAX_GRID_IMAGES], labels[:MAX_GRID_IMAGES], MAX_GRID_IMAGES
        orig = None if orig is None else orig[:MAX_GRID_IMAGES]

    columns = min(n, max_columns)
    groups = math.ceil(n / columns)
    rows_per_group = 1 if orig is None else 2
    rows = groups * rows_per_group
    label_space = 0.35  # inches at the left for the row labels
    cell = max(_CELL_INCHES, max(recon.shape[2:]) / _DPI)  # a 224-px image gets 224 px, not a shrunk copy
    width = columns * cell + label_space
    title = fit_title(title, width, 11) if title else title
    title_space = 0.45 + 0.2 * title.count("\n") if title else 0.1
    lines = max([label.count("\n") + 1 for label in labels if label] or [1])   # caption lines over a cell
    height = rows * (cell + 0.12 + 0.13 * lines) + title_space
    figure = _new_figure(width, height)
    if title:
        figure.suptitle(title, fontsize=11)
    axes = figure.subplots(rows, columns, squeeze=False)
    figure.subplots_adjust(
        left=label_space / width,
        right=0.99,
        bottom=0.02,
        top=1.0 - title_space / height,
        wspace=0.08,
        hspace=0.05 + 0.25 * lines,
    )
    for group in range(groups):
        recon_row = group * rows_per_group + rows_per_group - 1
        for column in range(columns):
            index = group * columns + column
            if index >= n:
                for row in range(rows_per_group):
                    axes[group * rows_per_group + row][column].set_visible(False)
                continue
            if orig is not None:
                _show_image(axes[recon_row - 1][column], orig[index])
            ax = axes[recon_row][column]
            _show_image(ax, recon[index])
            if labels[index] is not None:
                ax.set_title(labels[index], fontsize=8, pad=2)
        if orig is not None:
            axes[recon_row - 1][0].set_ylabel("original", fontsize=8)
        axes[recon_row][0].set_ylabel("reconstruction", fontsize=8)
    return save_figure(figure, path)


def _member_label(panel: str, name: str) -> str:
    """``loss[3]`` under the panel ``loss`` is labelled ``[3]``: the panel's title already names it."""
    return name[len(panel):] if name.startswith(panel + "[") else name


def _series_xy(name: str, series: Any) -> tuple[np.ndarray, np.ndarray]:
    """The x and y values of one history entry (a list of floats or {"x": [...], "y": [...]})."""
    if isinstance(series, Mapping):
        if "y" not in series:
            raise ConfigError(f"curve {name!r} is a mapping without a 'y' entry")
        y_raw, x_raw = series["y"], series.get("x")
    else:
        y_raw, x_raw = series, None
    if hasattr(y_raw, "tolist"):
        y_raw = y_raw.tolist()
    if hasattr(x_raw, "tolist"):
        x_raw = x_raw.tolist()
    y_values = [_as_float(v) for v in y_raw]
    y = np.array([np.nan if v is None else v for v in y_values], dtype=np.float64)
    y[~np.isfinite(y)] = np.nan  # inf/nan are gaps, not axis limits
    if x_raw is None:
        x = np.arange(len(y), dtype=np.float64)
    else:
        x_values = [_as_float(v) for v in x_raw]
        x = np.array([np.nan if v is None else v for v in x_values], dtype=np.float64)
        if len(x) != len(y):
            raise ConfigError(f"curve {name!r} has {len(x)} x values but {len(y)} y values")
    return x, y


def _wants_log_scale(y: np.ndarray) -> bool:
    """True when every finite value is positive and they span more than two decades."""
    finite = y[np.isfinite(y)]
    if finite.size < 2 or np.any(finite <= 0):
        return False
    return math.log10(float(finite.max()) / float(finite.min())) > _LOG_DECADES


def curves_figure(
    history: Mapping[str, Any],
    path: str | os.PathLike,
    *,
    x_label: str = "iteration",
    title: str | None = None,
) -> Path:
    """Write a PNG with one panel per recorded series (loss, PSNR, ...).

    Series named ``name[i]`` (e.g. one per client or restart) share the panel ``name``.

    Args:
        history: series name → list of floats, or → ``{"x": [...], "y": [...]}`` for a series
            recorded every k iterations. Strings ``"inf"``/``"nan"`` and None become gaps.
        path: where the PNG goes (written atomically).
        x_label: the label of every x axis.
        title: a title over the whole figure.

    A positive series spanning more than two decades gets a log y axis; a series with one
    value is drawn as a marker; an empty history gives a figure saying "no curve recorded".

    Returns:
        The path of the written PNG.
    """
    panels: dict[str, list[tuple[str, np.ndarray, np.ndarray]]] = {}
    for name, values in history.items():
        name = str(name)
        panels.setdefault(name.split("[", 1)[0], []).append((name, *_series_xy(name, values)))
    if not panels:
        return _message_figure("no curve recorded", path, title)
    columns = min(len(panels), 3)
    rows = math.ceil(len(panels) / columns)
    figure = _new_figure(4.0 * columns, 2.9 * rows + (0.4 if title else 0.0))
    if title:
        figure.suptitle(fit_title(title, 4.0 * columns, 11), fontsize=11)  # tight_layout makes room
    axes = figure.subplots(rows, columns, squeeze=False)
    for index, (panel, members) in enumerate(panels.items()):
        ax = axes[index // columns][index % columns]
        ax.set_xlabel(x_label, fontsize=9)
        ax.tick_params(labelsize=8)
        all_y = np.concatenate([y for _, _, y in members])
        finite = np.flatnonzero(np.isfinite(all_y))
        if len(members) == 1:
            last = np.flatnonzero(np.isfinite(members[0][2]))
            ax.set_title(f"{panel} (last {members[0][2][last[-1]]:.4g})" if last.size else panel, fontsize=10)
        else:
            ax.set_title(f"{panel} ({len(members)} runs)", fontsize=10)
        if not finite.size:
            ax.set_xticks([])
            ax.set_yticks([])
            ax.text(0.5, 0.5, "no values", ha="center", va="center", transform=ax.transAxes, color="0.4")
            continue
        ax.grid(True, color="0.9", linewidth=0.6)
        for k, (name, x, y) in enumerate(members):
            style = dict(marker="o", linestyle="none") if len(y) == 1 else dict(linewidth=1.2 if len(members) == 1 else 0.9)
            ax.plot(x, y, color=f"C{k % 10}", label=_member_label(panel, name) if 1 < len(members) <= 10 else None,
                    **style)
        if 1 < len(members) <= 10:   # below the axes: inside, it covers the curves it names
            ax.legend(fontsize=7, ncol=min(len(members), 4), loc="upper center", bbox_to_anchor=(0.5, -0.22),
                      frameon=False, handlelength=1.2, columnspacing=0.8)
        if _wants_log_scale(all_y[finite]):
            ax.set_yscale("log")
    for index in range(len(panels), rows * columns):
        axes[index // columns][index % columns].set_visible(False)
    figure.tight_layout()
    return save_figure(figure, path)
