"""The analyser's predictions against the attacks' actual outcomes over a grid of
(architecture, batch size) pairs, on real photos / digits, float32.

    .venv/bin/python benchmarks/analyzer_grid.py

For each pair: the analyser's prediction per closed-form attack (exact / no / uncertain) and
the attack's measured minimum PSNR over the batch (exact = >= 60 dB), or why it refused.
Prints a markdown table and the number of disagreements.
"""

from __future__ import annotations

import time

import torch

import gradleak as gl
from gradleak.analysis import analyze
from gradleak.attacks import COPA, RGAP, QianInversion
from gradleak.data import load_builtin
from gradleak.errors import AttackNotApplicable
from gradleak.metrics import match, psnr
from gradleak.models import CNN6, FCN3, MLP, LeNet
from gradleak.models.qian import QianConvHead

EXACT_DB = 60.0


def grid():
    narrow = (12, 24, 24, 24, 32, 32)
    return [
        ("MLP 3072-256-32-10", lambda: MLP(3072, (256, 32), 10), "photos32", 1, "cross_entropy"),
        ("MLP 3072-256-32-10", lambda: MLP(3072, (256, 32), 10), "photos32", 4, "cross_entropy"),
        ("MLP 3072-256-32-10", lambda: MLP(3072, (256, 32), 10), "photos32", 8, "cross_entropy"),
        ("MLP 3072-64-10", lambda: MLP(3072, (64,), 10), "photos32", 8, "cross_entropy"),
        ("MLP 3072-16-10", lambda: MLP(3072, (16,), 10), "photos32", 8, "cross_entropy"),
        ("MLP 3072-4-10", lambda: MLP(3072, (4,), 10), "photos32", 8, "cross_entropy"),
        ("MLP 3072-64-10 sigmoid", lambda: MLP(3072, (64,), 10, "sigmoid"), "photos32", 4, "cross_entropy"),
        ("MLP 3072-1-1-1-10 tanh", lambda: MLP(3072, (1, 1, 1), 10, "tanh"), "photos32", 1, "cross_entropy"),
        ("ConvHead k4 s1 (Qian holds)", lambda: QianConvHead(4, 1), "photos16", 1, "cross_entropy"),
        ("ConvHead k8 s2 (Qian fails)", lambda: QianConvHead(8, 2), "photos16", 1, "cross_entropy"),
        ("ConvHead k4 s1 (Qian holds)", lambda: QianConvHead(4, 1), "photos16", 4, "cross_entropy"),
        ("FCN3 784-1000-100-1", lambda: FCN3(784), "digits28", 1, "binary_cross_entropy"),
        ("CNN6 narrow @16", lambda: CNN6(3, 1, 16, widths=narrow), "photos16", 1, "binary_cross_entropy"),
        ("CNN6 narrow @16, 10 classes", lambda: CNN6(3, 10, 16, widths=narrow), "photos16", 1, "cross_entropy"),
        ("CNN6 @16, layer-1 width 1 (rank-deficient)", lambda: CNN6(3, 1, 16, widths=(1,) + narrow[1:]),
         "photos16", 1, "binary_cross_entropy"),
        ("CNN6 @16, layer-1 width 3 (rank-deficient)", lambda: CNN6(3, 1, 16, widths=(3,) + narrow[1:]),
         "photos16", 1, "binary_cross_entropy"),
        ("CNN6 @16, layer-5 width 4 (rank-deficient)", lambda: CNN6(3, 1, 16, widths=(12, 24, 24, 24, 4, 32)),
         "photos16", 1, "binary_cross_entropy"),
        ("LeNet (DLG, sigmoid, bias) @16", lambda: LeNet(3, 10, 16), "photos16", 1, "cross_entropy"),
        ("CNN6 narrow @16", lambda: CNN6(3, 1, 16, widths=narrow), "photos16", 2, "binary_cross_entropy"),
    ]


def data(name):
    if name == "photos32":
        return load_builtin("photos", size=32)
    if name == "photos16":
        return load_builtin("photos", size=16)
    digits = load_builtin("digits", n=64).resize(28)
    return digits


def measure(attack_cls, model, images, labels, loss):
    spec = gl.DataSpec.from_images(images)
    labels = labels % 2 if loss == "binary_cross_entropy" else labels
    update = gl.fedsgd_update(model, images, labels, loss=loss, spec=spec, share_labels=True)
    try:
        rec = attack_cls(model, gl.ThreatModel(labels_known=True)).reconstruct(update)
    except AttackNotApplicable as reason:
        return None, f"refused: {reason.condition}"
    if rec.images is None or rec.images.shape[0] < images.shape[0]:
        got = 0 if rec.images is None else rec.images.shape[0]
        return None, f"partial: {got} of {images.shape[0]} recovered"
    perm = match(rec.images, images)
    return float(psnr(rec.images[perm], images).min()), ""


def main():
    torch.set_num_threads(1)
    attacks = {"qian": QianInversion, "rgap": RGAP, "copa": COPA}
    print("| architecture | B | attack | predicted | measured min PSNR (dB) | agree |")
    print("|---|---|---|---|---|---|")
    disagreements = 0
    pairs = 0
    for label, build, dataset, B, loss in grid():
        torch.manual_seed(0)
        model = build()
        ds = data(dataset)
        images, labels = ds.images[:B], ds.labels[:B]
        report = analyze(model, tuple(images.shape[1:]), B, loss=loss)
        pairs += 1
        for name, cls in attacks.items():
            verdict = report.predicted(name)
            if not verdict.applies and name != "qian":
                if B > 1 or "not a chain" in verdict.reason:
                    continue
            start = time.perf_counter()
            value, why = measure(cls, model, images, labels, loss)
            seconds = time.perf_counter() - start
            measured_exact = value is not None and value >= EXACT_DB
            predicted = {True: "exact", False: "no", None: "uncertain"}[verdict.exact]
            agree = "-" if verdict.exact is None else ("yes" if verdict.exact == measured_exact else "NO")
            disagreements += agree == "NO"
            shown = f"{value:.1f}" if value is not None else why
            print(f"| {label} | {B} | {name} | {predicted} | {shown} ({seconds:.1f} s) | {agree} |", flush=True)
    print(f"\n{pairs} (architecture, batch size) pairs; {disagreements} disagreements (exact = >= {EXACT_DB} dB)")


if __name__ == "__main__":
    main()
