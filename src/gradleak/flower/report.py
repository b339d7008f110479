"""The audit report of a Flower run: per round and client the reconstructions, their update
residuals (certified exact or not) and scores, the verdicts with their reasons, leakage as
the global model trains, the secure-aggregation sum, and the client gates' decisions.

:func:`write_report` writes, atomically (:mod:`gradleak._io`): ``audit.json`` (everything),
``leakage.png`` (per client and round: the best PSNR when the truth is known, and the best
update residual, the truth-free measure, on a log scale; the sum dashed; held-out accuracy
when given; the title says which it shows), ``grids/*.png`` (every reconstruction, under its
originals when the truth is known, :func:`gradleak.report.reconstruction_grid`) and
``report.html`` (one self-contained page built with :func:`gradleak.report.html.html_page`;
every string is escaped: node ids, reasons and messages come from clients). A real audit
has no truth: the residual and the reconstructions are what it shows.
"""

from __future__ import annotations

import math
from html import escape
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from .._io import atomic_write_json, atomic_write_text, output_dir, save_figure, to_jsonable
from ..report import reconstruction_grid, share_notes
from ..report.page import html_page, image_tag
from .records import AuditRecord

__all__ = ["write_report", "leakage_figure", "leakage_series"]


def _who(record: AuditRecord, names: Mapping[int, str]) -> str:
    if record.node_id is None:
        return f"sum of {len(record.clients)}"
    return names.get(record.node_id) or record.client or f"node {record.node_id}"


def _num(value: Any, spec: str = ".1f", unit: str = "") -> str:
    if value is None or isinstance(value, bool):
        return "n/a"
    number = float(value)
    if math.isnan(number):
        return "n/a"
    if math.isinf(number):
        return "∞" if number > 0 else "−∞"
    text = f"{number:{spec}}"
    return (text[1:] if text.startswith("-") and float(text) == 0 else text) + unit   # no "-0.00"


def _table(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """An HTML table from already-escaped cells."""
    head = "".join(f"<th>{h}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<div class='wide'><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>"


def _protocol(record: AuditRecord) -> str:
    p = record.protocol or {}
    if record.kind == "secure-aggregation" and record.sum_protocol is not None:
        return escape(f"sum: {record.sum_protocol.num_examples} examples, lr {record.sum_protocol.lr:g}")
    if not p:
        return "n/a"
    sources = p.get("sources", {})
    steps = p.get("local_steps")
    text = (f"{p.get('num_examples')} ex., {steps if steps is not None else '?'} step(s) of "
            f"{p.get('batch_size')}, lr {p.get('lr')}")
    unknown = [k for k, v in sources.items() if v == "unknown"]
    return escape(text + (f" (unknown: {', '.join(unknown)})" if unknown else ""))


CERTIFIED = "CERTIFIED EXACT"


def _verdict(record: AuditRecord) -> str:
    """The verdict in bold and its first reason (the protocol's, or the gate's when it defended);
    a certified reconstruction above it; every reason is in the section below."""
    if record.explanation is None:
        return escape(record.status)
    first = record.explanation.reasons[0] if record.explanation.reasons else ""
    best = record.best
    certified = (f"<strong class='certified'>{CERTIFIED}</strong>: {escape(best.attack)} reproduces the update to "
                 f"{best.residual_value:.1g}<br>" if best is not None and best.certified else "")
    return certified + f"<strong>{escape(record.verdict)}</strong>" + (
        f"<br><span class='note'>{escape(first)}</span>" if first else "")


def _outcome_text(o: Any) -> str:
    if o.status != "ok":
        return f"{o.attack}: {o.status}" + (f" ({o.message})" if o.message else "")
    parts = []
    if o.residual is not None:
        parts.append("residual n/a" if o.residual.value is None else f"residual {o.residual.value:.2g}"
                     + (f", {CERTIFIED}" if o.certified else ""))
    if o.psnr_mean is not None:
        labels = "" if o.label_accuracy is None else f", labels {o.label_accuracy:.0%}"
        parts.append(f"{_num(o.psnr_mean, unit=' dB')}, SSIM {_num(o.ssim_mean, '.2f')}{labels}")
    return f"{o.attack}: " + ("; ".join(parts) or "ok")


def _results(record: AuditRecord) -> str:
    parts = [_outcome_text(o) for o in record.attacks]
    if record.status != "audited":
        parts.append(f"{record.status}: {record.message}")
    return "<br>".join(escape(p) for p in parts) or "not attacked (capture / explanation only)"


def _series(records: Sequence[AuditRecord], names: Mapping[int, str], value) -> dict[str, list[tuple[int, float]]]:
    series: dict[str, list[tuple[int, float]]] = {}
    for r in records:
        v = value(r)
        if v is not None and math.isfinite(v) and (v > 0 or value is not _residual):
            series.setdefault(_who(r, names) if r.node_id is not None else "secure-aggregation sum", []).append(
                (r.server_round, v))
    return series


def leakage_series(records: Sequence[AuditRecord], names: Mapping[int, str] | None = None
                   ) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """What the leakage plot draws: ``{"psnr": {who: [(round, best PSNR)]}, "residual": {who:
    [(round, best update residual)]}}`` (who: the client's name, or ``secure-aggregation sum``);
    PSNR only where the truth was known, the residual wherever an attack recovered images."""
    names = dict(names or {})
    return {"psnr": _series(records, names, lambda r: r.best_psnr), "residual": _series(records, names, _residual)}


def _residual(record: AuditRecord) -> float | None:
    value = record.best_residual
    return None if value is None else max(value, 1e-17)     # an exact 0 on the log axis


def _panel(ax, series: dict[str, list[tuple[int, float]]], ylabel: str, log: bool = False,
           certified: Sequence[tuple[int, float]] = ()) -> None:
    from matplotlib.ticker import MaxNLocator

    for label, points in sorted(series.items()):
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o",
                linestyle="--" if label.startswith("secure") else "-", label=label)
    if certified:
        ax.scatter([p[0] for p in certified], [p[1] for p in certified], s=160, facecolors="none", edgecolors="black",
                   linewidths=1.5, label="certified exact", zorder=5)
    if log:
        ax.set_yscale("log")
    rounds = sorted({r for points in series.values() for r, _ in points})
    if rounds:
        ax.set_xlim(rounds[0] - 0.5, rounds[-1] + 0.5)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    ax.set_xlabel("server round")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)


def leakage_figure(records: Sequence[AuditRecord], path: Path, names: Mapping[int, str],
                   accuracy: Mapping[int, float] | None = None) -> Path:
    """Per client over the rounds (the secure-aggregation sum dashed): the best PSNR of the
    audit's attacks when the truth is known, and the best update residual (truth-free, log
    scale; certified-exact points circled) when reconstructions were made; the global
    model's held-out accuracy on a second axis when given. The title says what is shown."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    drawn = leakage_series(records, names)
    psnr, residual = drawn["psnr"], drawn["residual"]
    certified = [(r.server_round, _residual(r)) for r in records if r.certified and _residual(r) is not None]
    panels = [p for p, present in (("psnr", psnr), ("residual", residual)) if present] or ["residual"]
    figure = Figure(figsize=(9.0 if len(panels) == 1 else 14.0, 4.0), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, len(panels), squeeze=False)[0]
    handles: list = []
    for ax, panel in zip(axes, panels):
        if panel == "psnr":
            _panel(ax, psnr, "best PSNR of the audit's attacks (dB; needs the truth)")
        else:
            _panel(ax, residual, "best update residual (truth-free; log)", log=True, certified=certified)
            tolerances = {o.residual.tolerance for r in records for o in r.attacks if o.residual is not None}
            if len(tolerances) == 1 and next(iter(tolerances)) > 0:
                ax.axhline(next(iter(tolerances)), color="black", linestyle=":", linewidth=1,
                           label=f"certified exact below ({next(iter(tolerances)):.2g})")
            ax.set_ylim(top=max([1.0] + [v for points in residual.values() for _, v in points]) * 2)
        handles = ax.get_legend_handles_labels()[0] if not handles or panel == "residual" else handles
    if accuracy:
        twin = axes[-1].twinx()
        rounds = sorted(accuracy)
        twin.plot(rounds, [100 * accuracy[k] for k in rounds], color="grey", marker="s", linestyle=":",
                  label="held-out accuracy")
        twin.set_ylabel("global model held-out accuracy (%)")
        twin.set_ylim(0, 100)
        handles += twin.get_legend_handles_labels()[0]
    if handles:     # outside the axes, where it hides no line
        axes[-1].legend(handles=handles, loc="upper left", bbox_to_anchor=(1.16 if accuracy else 1.02, 1.0),
                        fontsize=8, borderaxespad=0.0)
    shown = " and ".join({"psnr": "best PSNR (with the truth)", "residual": "update residual (truth-free)"}[p]
                         for p in panels)
    figure.suptitle(f"Leakage as the global model trains: {shown}" + ("" if psnr or residual else ": nothing measured"))
    figure.tight_layout()
    return save_figure(figure, path)


def _grids(records: Sequence[AuditRecord], out: Path, names: Mapping[int, str]) -> dict[int, list[Path]]:
    """One grid per attack that recovered images: the reconstructions, under their originals
    when the truth is known (matched), with the update residual in the title."""
    grids: dict[int, list[Path]] = {}
    for index, r in enumerate(records):
        for o in r.attacks:
            if o.images is None or o.images.ndim != 4 or o.images.shape[0] == 0:
                continue
            who = "sum" if r.node_id is None else f"node-{r.node_id}"
            path = out / "grids" / f"round-{r.server_round:03d}-{who}-{o.attack}.png"
            scored = r.truth is not None and o.psnr is not None and o.images.shape == r.truth[0].shape
            measure = ("" if o.residual is None or o.residual.value is None else
                       f"residual {o.residual.value:.2g}" + (f", {CERTIFIED}" if o.certified else ""))
            title = f"round {r.server_round}, {_who(r, names)}: {o.attack}" + "".join(
                f", {m}" for m in (measure, _num(o.psnr_mean, unit=" dB") if scored else "") if m)
            reconstruction_grid(o.images.clamp(0, 1), path, originals=r.truth[0] if scored else None,
                                psnr=o.psnr if scored else None, title=title,
                                notes=share_notes(None if o.residual is None else o.residual.shares,
                                                  o.images.shape[0]))
            grids.setdefault(index, []).append(path)
    return grids


def _details(records: Sequence[AuditRecord], grids: Mapping[int, list[Path]], names: Mapping[int, str]) -> str:
    parts = ["<h2>Per round and client: why, and what was recovered</h2><p>Every reason behind each verdict, "
             "then the attacks' notes, then every reconstruction with its update residual (with the truth: "
             "originals above, matched reconstructions below, PSNR per image).</p>"]
    for index, r in enumerate(records):
        if r.explanation is None and not grids.get(index):
            continue
        verdict = r.verdict or r.status
        mark = f" &middot; <strong class='certified'>{CERTIFIED}</strong>" if r.certified else ""
        parts.append(f"<details open><summary>round {r.server_round}, {escape(_who(r, names))}: "
                     f"<strong>{escape(verdict)}</strong>{mark}</summary>")
        if r.explanation is not None:
            parts.append("<ul class='notes'>" + "".join(f"<li>{escape(x)}</li>" for x in r.explanation.reasons)
                         + "</ul>")
        for o in r.attacks:
            said = ([o.reason] if o.reason else []) + ([o.message] if o.message else []) + (
                [o.residual.describe()] if o.residual is not None else []) + o.notes[:4]
            if said:
                parts.append(f"<p class='note'>{escape(o.attack)}: {escape('; '.join(said))}</p>")
        for path in grids.get(index, []):
            parts.append(f"<figure>{image_tag(path, path.stem)}</figure>")
        parts.append("</details>")
    return "".join(parts)


def _gate_section(records: Sequence[AuditRecord], names: Mapping[int, str]) -> str:
    from .gate import ACTION, BLOCK_PREFIX, PSNR, PSNR_AFTER, SECONDS

    actions = {0: "passed (below the threshold)", 1: "defended", -1: "passed unmeasured"}
    rows = []
    for r in records:
        if r.kind != "client":
            continue
        if r.status == "no update" and BLOCK_PREFIX in r.message:
            rows.append([str(r.server_round), escape(_who(r, names)), "blocked", escape(r.message), "", ""])
        elif r.gate:
            rows.append([str(r.server_round), escape(_who(r, names)), escape(actions.get(r.gate.get(ACTION), "?")),
                         _num(r.gate.get(PSNR), unit=" dB") if r.gate.get(PSNR, -1) >= 0 else "n/a",
                         _num(r.gate.get(PSNR_AFTER), unit=" dB") if r.gate.get(PSNR_AFTER, -1) >= 0 else "n/a",
                         _num(r.gate.get(SECONDS), ".1f", " s")])
    if not rows:
        return ""
    return ("<h2>Client-side gates</h2><p>What each client's gate measured on its own update before sending it "
            "(against its own images), and what it did.</p>"
            + _table(["round", "client", "decision", "gate's best PSNR", "after the defense", "gate time"], rows))


def write_report(out: str | Path, audit: Any, *, names: Mapping[int, str] | None = None,
                 accuracy: Mapping[int, float] | None = None, wall_seconds: float | None = None,
                 notes: Sequence[str] = (), extra: Mapping[str, Any] | None = None,
                 title: str = "Flower leakage audit") -> Path:
    """Write the report of ``audit`` (a :class:`~gradleak.flower.LeakageAuditStrategy`, or a
    list of :class:`AuditRecord`) into folder ``out``; returns the path of ``report.html``.
    ``names``: display names of node ids; ``accuracy``: held-out accuracy per round."""
    out = output_dir(out)
    names = dict(names or {})
    records: list[AuditRecord] = sorted(getattr(audit, "records", audit), key=lambda r: (
        r.server_round, r.kind != "client", names.get(r.node_id) or r.client or "", r.node_id or 0))
    settings = audit.to_json() if hasattr(audit, "to_json") else {"records": [r.to_json() for r in records]}
    atomic_write_json(out / "audit.json", {**settings, "names": {str(k): v for k, v in names.items()},
                                           "accuracy": dict(accuracy or {}), "wall_seconds": wall_seconds,
                                           "notes": list(notes), **dict(extra or {})})
    leakage = leakage_figure(records, out / "leakage.png", names, accuracy)
    grids = _grids(records, out, names)
    rows = [[str(r.server_round), escape(_who(r, names)), _protocol(r), _verdict(r), _results(r),
             _num(r.seconds, ".1f", " s")] for r in records]
    certified = [r for r in records if r.certified]
    summary = [f"<p>{len(records)} record(s) over rounds "
               f"{escape(', '.join(map(str, sorted({r.server_round for r in records}))) or 'none')}"
               + (f"; wall time {wall_seconds:.0f} s" if wall_seconds is not None else "") + ". "
               f"<strong>{len(certified)}</strong> update(s) <strong>{CERTIFIED}</strong>: an attack's reconstruction "
               "reproduces the update to within the certified tolerance (the update residual, which needs no "
               "ground truth: the images shown are what the server recovers).</p>"]
    summary += [f"<p class='note'>{escape(n)}</p>" for n in notes]
    sections = [*summary, "<h2>Leakage per round</h2>", f"<figure>{image_tag(leakage, 'leakage per round')}</figure>",
                "<h2>Every audited update</h2>",
                _table(["round", "client", "protocol", "verdict: the main reason", "what the attacks got", "audit time"],
                       rows),
                _gate_section(records, names), _details(records, grids, names),
                "<h2>Settings</h2>", f"<pre>{escape(_settings_text(settings))}</pre>"]
    subtitle = escape("What a Flower server could reconstruct from each client's update, and why.")
    return atomic_write_text(out / "report.html", html_page(title, subtitle, sections))


def _settings_text(settings: Mapping[str, Any]) -> str:
    import json

    return "\n".join(f"{key}: {json.dumps(to_jsonable(value))}"[:600] for key, value in settings.items()
                     if key != "records")
