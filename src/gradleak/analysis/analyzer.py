"""The leakage analyser: from the architecture (and its weights) alone, can a client's data be rebuilt?

:func:`analyze` walks the model and reports, layer by layer and in total, which attacks
apply and whether exact recovery is predicted, with the reason in words:

- **FC-bias** (one sample): a fully connected layer with bias fed the input.
- **Qian batch** (arXiv 2010.15718): B samples through a ReLU layer with bias fed the
  input; needs h >= B units, and in practice enough units inactive per sample to isolate
  each one (about h/2 of them; predicted reliable for h >= 16B, measured on the grid of
  benchmarks/analyzer_grid.py, uncertain for B <= h < 16B).
  Through convolutions: Qian's condition ``h >= (d/d')^2 C`` on every convolution below
  the first fully connected layer with bias.
- **R-GAP** (arXiv 2010.07733): batch 1, a chain of linear/conv layers with invertible
  activations; exact when every layer-wise system has full rank (the rank analysis RA,
  numerically on the model's weights when the layers are small enough, else by counting).
- **COPA** (arXiv 2111.10178): same systems; its security measure (sum of log10
  condition numbers, infinite when a layer is rank deficient).
- **Optimisation** (DLG / Inverting Gradients): always applicable; approximate, never
  predicted exact.

A malicious server (``LeakageReport.malicious``, :func:`malicious_verdicts`) changes the
model it sends, so the architecture protects nothing from it: the imprint module (Fowl et
al. 2022) gives every sample alone in one of its N bins exactly, an expected
``B (1 - 1/N)^(B-1)`` of B from one FedSGD update; trap weights (Boenisch et al. 2023) need a
fully connected first layer with ReLU; fishing (Wen et al. 2022) a classifier layer with bias.

Nothing here uses client data: the numeric checks run the model on a seeded Gaussian probe.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..attacks._chain import trace_chain
from ..attacks._layers import classifier_layer, trace_linear_layers
from ..attacks.copa import copa_security
from ..attacks.qian import qian_cnn_condition
from ..attacks.rgap import rank_analysis, rgap_last_layer
from ..client import fedsgd_update
from ..errors import AttackNotApplicable
from ..limits import check_batch, check_input_shape

__all__ = ["AttackVerdict", "LeakageReport", "analyze", "report_table", "load_model_spec", "malicious_verdicts",
           "IMPRINT_BINS"]


@dataclass
class AttackVerdict:
    attack: str
    applies: bool
    exact: bool | None          # True: exact predicted; False: not exact; None: uncertain / approximate
    reason: str

    def to_json(self) -> dict:
        return {"attack": self.attack, "applies": self.applies, "exact": self.exact, "reason": self.reason}


@dataclass
class LeakageReport:
    model: str
    input_shape: tuple[int, ...]
    batch_size: int
    layers: list[dict[str, Any]]
    attacks: list[AttackVerdict]
    verdict: str
    reasons: list[str] = field(default_factory=list)
    copa_security: dict | None = None
    malicious: list[AttackVerdict] = field(default_factory=list)   # what a malicious server gets

    @property
    def summary(self) -> str:
        """"An honest-but-curious server: ...; a malicious server: ..." in one sentence."""
        honest = self.verdict.lower()
        exact = [v for v in self.malicious if v.exact]
        other = [v.attack for v in self.malicious if v.applies and not v.exact]
        malicious = (f"exact recovery by {', '.join(v.attack for v in exact)} ({exact[0].reason.split(':')[0]})"
                     if exact else "approximate recovery" if other else "no malicious-server attack applies")
        return f"an honest-but-curious server: {honest}; a malicious server: {malicious}"

    def predicted(self, attack: str) -> AttackVerdict:
        return next(a for a in self.attacks if a.attack == attack)

    @property
    def exact_predicted(self) -> bool:
        return any(a.exact for a in self.attacks)

    def to_json(self) -> dict:
        return {"model": self.model, "input_shape": list(self.input_shape), "batch_size": self.batch_size,
                "verdict": self.verdict, "reasons": self.reasons, "attacks": [a.to_json() for a in self.attacks],
                "layers": self.layers, "copa_security": self.copa_security,
                "malicious": [a.to_json() for a in self.malicious], "summary": self.summary}


def load_model_spec(spec: Any, input_shape: tuple[int, ...], num_classes: int = 10,
                    **kwargs) -> tuple[nn.Module, str]:
    """The model a :class:`~gradleak.models.ModelSpec` (or a zoo name / ``package.module:factory``
    with ``kwargs`` as its options) builds for ``input_shape``; returns (model, loss). A
    factory is the user's own code, named on the command line or in the user's config."""
    from ..models import ModelSpec

    shape = check_input_shape("--input-shape", input_shape)
    if not isinstance(spec, ModelSpec):
        spec = ModelSpec(spec, kwargs)
    built = spec.build(shape, num_classes)
    return built.module, built.loss


def _outputs(name: str, model: nn.Module, input_shape) -> int:
    from ..models.spec import model_outputs

    return model_outputs(name, model, input_shape)


def _probe_gradient(model, input_shape, loss, dtype):
    generator = torch.Generator().manual_seed(1234)
    x = torch.rand((1, *input_shape), generator=generator).to(dtype)
    label = torch.tensor([1])
    return fedsgd_update(model, x, label, loss=loss)


def analyze(model: nn.Module | str, input_shape: tuple[int, ...], batch_size: int = 1, *, num_classes: int = 10,
            loss: str | None = None, labels_known: bool = True, numeric: bool = True,
            max_unknowns: int = 4096) -> LeakageReport:
    """Predict, from the architecture and weights, which attacks recover the client's inputs exactly."""
    input_shape = check_input_shape("input_shape", tuple(input_shape))
    check_batch("batch_size", batch_size, input_shape)
    name = model if isinstance(model, str) else type(model).__name__
    if isinstance(model, str):
        model, default_loss = load_model_spec(model, input_shape, num_classes)
    else:
        default_loss = "binary_cross_entropy" if _outputs(name, model, input_shape) == 1 else "cross_entropy"
    loss = loss or default_loss
    params = {n: p.detach() for n, p in model.named_parameters()}
    buffers = {n: b.detach() for n, b in model.named_buffers()}
    B = batch_size
    chain = trace_chain(model, input_shape, params, buffers)
    linears = trace_linear_layers(model, input_shape, params, buffers)
    layers: list[dict[str, Any]] = [{"layer": l.name, "description": l.describe(), "activation": l.activation,
                                     "unknowns": l.unknowns, "outputs": l.outputs} for l in chain.layers]
    by_name = {row["layer"]: row for row in layers}
    verdicts = _fc_verdicts(chain, linears, B, by_name)
    structural, security = _rgap_copa_verdicts(model, chain, params, input_shape, loss, B, by_name,
                                               labels_known=labels_known, numeric=numeric, max_unknowns=max_unknowns)
    verdicts += structural
    verdicts.append(_optimisation_verdict(B))
    verdict, reasons = _overall_verdict(verdicts)
    return LeakageReport(name, input_shape, B, layers, verdicts, verdict, reasons, security,
                         malicious_verdicts(linears, B))


# A malicious server ---------------------------------------------------------------------

IMPRINT_BINS = 128   # the imprint attack's default number of bins


def malicious_verdicts(linears, B: int, bins: int = IMPRINT_BINS) -> list[AttackVerdict]:
    """What a server that changes the model it sends gets (threat models F/G of the SoK),
    from the model's linear layers (``trace_linear_layers``) and the batch size."""
    alone = B * (1 - 1 / bins) ** (B - 1)
    verdicts = [AttackVerdict(
        "imprint", True, True,
        f"about {alone:.1f} of {B} samples exactly: with {bins} bins a sample is alone in its bin with probability "
        f"(1 - 1/{bins})^{B - 1} = {alone / B:.2f}; the module is inserted in front of any model (FedSGD; more bins, "
        "more samples)")]
    first = next((t for t in linears if t.receives_model_input and t.has_bias), None)
    verdicts.append(AttackVerdict(
        "trap-weights", first is not None, None if first is not None else False,
        f"layer {first.name!r} is fed the input: samples that fire one of its {first.out_features} units alone come "
        "back exactly; how many depends on how alike the images are" if first is not None else
        "no fully connected layer with bias is fed the input"))
    head = classifier_layer(linears)
    head = head if head is not None and head.has_bias else None
    verdicts.append(AttackVerdict(
        "fishing", head is not None, None if head is not None else False,
        f"classifier {head.name!r}: the gradient of one target-class sample is isolated and inverted by optimisation "
        "(approximate)" if head is not None else "no classifier layer with bias"))
    return verdicts


# FC-bias and Qian ---------------------------------------------------------------------
def _fc_verdicts(chain, linears, B: int, by_name: dict[str, dict[str, Any]]) -> list[AttackVerdict]:
    """FC-bias and Qian's verdicts; each convolution's row gets Qian's CNN condition."""
    first_fc = next((t for t in linears if t.has_bias), None)
    fc_on_input = first_fc is not None and first_fc.receives_model_input
    verdicts = [_fc_bias_verdict(first_fc, fc_on_input, B), _qian_verdict(chain, first_fc, fc_on_input, B)]
    for l in chain.layers:
        if l.kind == "conv2d":
            check = qian_cnn_condition(l)
            by_name[l.name]["qian_cnn_condition"] = {"holds": check.holds, "kernels": check.kernels,
                                                     "required": check.required}
    return verdicts


def _fc_bias_verdict(first_fc, fc_on_input: bool, B: int) -> AttackVerdict:
    if fc_on_input:
        return AttackVerdict("fc-bias", True, B == 1, f"layer {first_fc.name!r} (with bias) is fed the input"
                             + ("" if B == 1 else f"; a batch of {B} mixes the samples in every row"))
    return AttackVerdict("fc-bias", False, False,
                         "no fully connected layer with bias is fed the input" + (
                             f"; only the features entering {first_fc.name!r} are recovered, not the image"
                             if first_fc else ""))


def _qian_verdict(chain, first_fc, fc_on_input: bool, B: int) -> AttackVerdict:
    if first_fc is None:
        return AttackVerdict("qian", False, False, "no fully connected layer with bias")
    names = [l.name for l in chain.layers]
    index = names.index(first_fc.name) if first_fc.name in names else -1
    activation = chain.layers[index].activation if index >= 0 else "unknown"
    h = first_fc.out_features
    if not fc_on_input:
        below = chain.layers[:index] if index > 0 else []
        if not chain.is_chain or not below or any(l.kind != "conv2d" for l in below):
            return AttackVerdict("qian", False, False, f"{first_fc.name!r} is not fed the input nor by a plain chain "
                                 "of convolutions")
        checks = [qian_cnn_condition(l) for l in below]
        failing = [c for c in checks if not c.holds]
        lossy = [l.name for l in below if l.activation == "relu"]
        if failing or lossy:
            parts = [f"{c.layer!r} has h = {c.kernels} < (d/d')^2 C = {c.required:.3g}" for c in failing]
            parts += [f"ReLU after {n!r} is not invertible" for n in lossy]
            return AttackVerdict("qian", True, False, "Qian's CNN condition fails: " + "; ".join(parts))
        base = f"every convolution meets h >= (d/d')^2 C; features recovered at {first_fc.name!r}"
        if B == 1:
            return AttackVerdict("qian", True, True, base)
    else:
        base = f"{first_fc.name!r} (with bias, {h} units) is fed the input"
        if B == 1:
            return AttackVerdict("qian", True, True, base + ": one active unit suffices")
    if h < B:
        return AttackVerdict("qian", True, False, f"{h} hidden units < batch size {B}: Qian's condition fails")
    if activation != "relu":
        return AttackVerdict("qian", True, False, f"{activation} units are never inactive: nothing separates the "
                             f"{B} samples")
    if h >= 16 * B:
        return AttackVerdict("qian", True, True, f"{base}; h = {h} >= 16B = {16 * B}: about h/2 inactive units per "
                             "sample isolate each one")
    return AttackVerdict("qian", True, None, f"{base}; B <= h = {h} < 16B: separation depends on the activation "
                         "patterns (about h/2 inactive units per sample against B-1 needed)")


# R-GAP and COPA ------------------------------------------------------------------------
def _rgap_copa_verdicts(model, chain, params, input_shape, loss: str, B: int, by_name: dict[str, dict[str, Any]], *,
                        labels_known: bool, numeric: bool, max_unknowns: int
                        ) -> tuple[list[AttackVerdict], dict | None]:
    """R-GAP's and COPA's verdicts and COPA's security measure (None unless computed). Each
    layer's row gets its RA and, when checked numerically, its rank, deficit and condition."""
    if not chain.is_chain or chain.layers[-1].kind != "linear":
        why = "; ".join(chain.unsupported) or "the last layer is not fully connected"
        return [AttackVerdict("rgap", False, False, f"not a chain of affine layers: {why}"),
                AttackVerdict("copa", False, False, f"not a chain of affine layers: {why}")], None
    if B > 1:
        return [AttackVerdict("rgap", False, False, f"one sample per update; the batch has {B}"),
                AttackVerdict("copa", False, False, f"one image per update; the batch has {B}")], None
    ranks = rank_analysis(chain)
    for r in ranks:
        by_name[r.layer]["rgap_ra"] = r.ra
    security = None
    if numeric and all(l.unknowns <= max_unknowns for l in chain.layers):
        exact, reason, security = _numerical_rank(model, chain, params, input_shape, loss, by_name)
    else:
        exact, reason = _counting_rank(chain, ranks)
    label_ok = labels_known or (chain.layers[-1].module.out_features >= 3)
    if not label_ok:
        exact, reason = False, "a binary head without bias needs the label, and it is not granted"
    copa_reason = reason if security is None else (
        f"security measure {security['measure']:.3g} (sum of log10 condition numbers)" if security["measure"]
        is not None else "a layer is rank deficient: secure against COPA (infinite measure)")
    verdicts = [AttackVerdict("rgap", label_ok, exact, reason), AttackVerdict("copa", label_ok, exact, copa_reason)]
    return verdicts, security


def _numerical_rank(model, chain, params, input_shape, loss: str, by_name: dict[str, dict[str, Any]]
                    ) -> tuple[bool, str, dict | None]:
    """RA on the model's weights: each layer-wise system of a seeded probe's gradient is
    built and its rank measured (COPA's security measure comes with it)."""
    try:
        probe = _probe_gradient(model, input_shape, loss, next(iter(params.values())).dtype)
        head = chain.layers[-1]
        last = rgap_last_layer(params[head.param("weight")], probe.tensors[head.param("weight")],
                               probe.tensors.get(head.param("bias")) if head.has_bias else None, loss, 1)
        sec = copa_security(chain, params, probe.tensors, *last.candidates[0])
        security = sec.to_json()
        for row in sec.layers:
            by_name[row["layer"]].update(numeric_rank=row["rank"], rank_deficit=row["deficit"],
                                         condition=row["condition"])
    except AttackNotApplicable as error:
        return False, str(error), None
    deficient = [row["layer"] for row in sec.layers if row["deficit"] > 0]
    reason = ("every layer-wise system has full rank on the model's weights (numerical RA)" if not deficient else
              f"rank deficit in {', '.join(map(repr, deficient))}: a null space of inputs fits the same gradients")
    return not deficient, reason, security


def _counting_rank(chain, ranks) -> tuple[bool, str]:
    """RA by counting constraints against unknowns; a ReLU below the head loses constraints."""
    lossy = [l.name for l in chain.layers[:-1] if l.activation == "relu"]
    deficient = [r for r in ranks if r.ra < 0]
    exact = not deficient and not lossy
    reason = ("by counting (RA): enough constraints in every layer" if exact else
              f"by counting (RA): deficit in {', '.join(repr(r.layer) for r in deficient)}" if deficient else
              f"ReLU in {', '.join(map(repr, lossy))} drops the weight constraints of inactive units")
    return exact, reason


# Optimisation and the overall verdict ---------------------------------------------------
def _optimisation_verdict(B: int) -> AttackVerdict:
    return AttackVerdict("optimisation", True, None,
                         "gradient matching (DLG / Inverting Gradients) always applies; it approximates, its "
                         f"quality falls with batch size ({B}) and depth; never predicted exact")


def _overall_verdict(verdicts: list[AttackVerdict]) -> tuple[str, list[str]]:
    """Exact if any closed-form attack is predicted exact; possible if one applies with an
    uncertain verdict; otherwise only optimisation remains."""
    exact = [v.attack for v in verdicts if v.exact]
    uncertain = [v.attack for v in verdicts if v.applies and v.exact is None and v.attack != "optimisation"]
    if exact:
        return "EXACT RECOVERY PREDICTED", [f"{v.attack}: {v.reason}" for v in verdicts if v.exact]
    if uncertain:
        return "EXACT RECOVERY POSSIBLE", [f"{v.attack}: {v.reason}" for v in verdicts if v.attack in uncertain]
    return "NO EXACT CLOSED-FORM RECOVERY", [
        "no closed-form attack's conditions hold; optimisation attacks may still approximate the data"]


def report_table(report: LeakageReport):
    """Two rich tables: the layers, and the attacks with the verdict."""
    from rich.table import Table

    layers = Table(title=f"{report.model} at {'x'.join(map(str, report.input_shape))}, batch {report.batch_size}")
    for column in ("layer", "description", "activation", "unknowns", "R-GAP RA", "rank deficit", "condition",
                   "Qian CNN"):
        layers.add_column(column)
    for row in report.layers:
        qc = row.get("qian_cnn_condition")
        condition = row.get("condition")
        layers.add_row(row["layer"], row["description"], row["activation"], str(row["unknowns"]),
                       _text(row.get("rgap_ra")), _text(row.get("rank_deficit")),
                       "-" if condition is None else f"{condition:.3g}",
                       "-" if qc is None else f"{'holds' if qc['holds'] else 'fails'} ({qc['kernels']} vs "
                                              f"{qc['required']:.3g})")
    attacks = Table(title=f"verdict: {report.verdict}")
    for column in ("attack", "applies", "exact recovery", "why"):
        attacks.add_column(column)
    for v in report.attacks:
        attacks.add_row(v.attack, "yes" if v.applies else "no",
                        {True: "predicted", False: "no", None: "uncertain"}[v.exact], v.reason)
    if report.malicious:
        attacks.add_section()
        for v in report.malicious:
            attacks.add_row(f"{v.attack} (malicious server)", "yes" if v.applies else "no",
                            {True: "predicted", False: "no", None: "uncertain"}[v.exact], v.reason)
    attacks.caption = report.summary
    return layers, attacks


def _text(value) -> str:
    return "-" if value is None else (f"{value:+d}" if isinstance(value, int) else str(value))
