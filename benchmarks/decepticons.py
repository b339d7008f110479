"""A malicious server (``decepticons``, Fowl et al. 2022) against the honest server's exact span
attack (``dager``) on GPT-2-small-sized text models (d = 768, 12 layers, 12 heads, random init,
built-in vocabulary), FedSGD updates of held-out sentences of the built-in corpus; the malicious
server places its bins on the corpus's train topics. Per cell: ROUGE-1/2, token accuracy (all
positions; and positions 0..n-2, which a causal LM's imprint reaches), exact sequences, seconds.
With ``--inspection`` instead: the client's ``inspect-model`` check on honest and served models.

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/decepticons.py --out runs/decepticons.json
    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/decepticons.py --inspection --seeds 20

One torch thread; cells already in ``--out`` are skipped (rerun to resume). Prints markdown tables
(docs/text.md).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402


def cell(model: str, attack: str, batch: int, length: int, width: int, layers: int) -> dict:
    from gradleak.attacks import Decepticons, SpanAttack
    from gradleak.client import ClientSetup
    from gradleak.errors import AttackNotApplicable
    from gradleak.models import ModelSpec
    from gradleak.text import load_text, load_tokenizer
    from gradleak.text.metrics import score_text
    from gradleak.text.pipeline import public_text, text_updates
    from gradleak.threat import ThreatModel

    built = ModelSpec(model, {"width": width, "layers": layers, "heads": max(1, width // 64), "positions": 128},
                      dtype="float32").build((length,), 2)
    tokenizer = load_tokenizer()
    data = load_text(n=batch, length=length)                       # held-out topics
    row = {"model": model, "attack": attack, "batch": batch, "length": length, "width": width, "layers": layers}
    started = time.perf_counter()
    sent, attacker = built, SpanAttack(built.module)
    if attack == "decepticons":
        attacker = Decepticons(built.module, ThreatModel(server="malicious"))
        module = attacker.serve(built.module, (length,), public_text(length, tokenizer, None))
        sent = replace(built, module=module)
    row["serve_s"] = round(time.perf_counter() - started, 2)
    started = time.perf_counter()
    (served,) = text_updates(sent, data.ids, data.labels, ClientSetup(batch_size=batch), None, tokenizer)
    row["client_s"] = round(time.perf_counter() - started, 2)
    started = time.perf_counter()
    try:
        result = attacker.reconstruct(served.update)
    except AttackNotApplicable as error:
        row.update(attack_s=round(time.perf_counter() - started, 2), refused=str(error)[:300])
        return row
    row["attack_s"] = round(time.perf_counter() - started, 2)
    scores = score_text(result.tokens, data.ids, tokenizer)
    row.update(scores.summary)
    flags = [s["recovered_tokens"] for s in scores.per_sequence]
    row["prefix_accuracy"] = sum(sum(f[:-1]) for f in flags) / max(1, sum(len(f) - 1 for f in flags))
    row["notes"] = result.notes[:4]
    return row


def inspection(seeds: int, length: int) -> None:
    from gradleak.attacks import Decepticons
    from gradleak.defenses import inspect_model
    from gradleak.models import ModelSpec
    from gradleak.text import load_text, load_tokenizer
    from gradleak.text.pipeline import public_text
    from gradleak.text.prior import language_prior
    from gradleak.threat import ThreatModel

    ids = load_text(n=8, length=length).ids
    public = public_text(length, load_tokenizer(), None)
    sizes = [{"width": 64, "layers": 2, "heads": 2}, {"width": 256, "layers": 4, "heads": 4},
             {"width": 768, "layers": 12, "heads": 12}]
    print(f"| model | sizes | honest flagged | served detected |")
    print("|---|---|---|---|")
    for name in ("gpt2", "gpt2-classifier", "bert"):
        for size in sizes:
            n = seeds if size["width"] < 768 else max(1, seeds // 10)
            flagged = detected = 0
            for seed in range(n):
                built = ModelSpec(name, {**size, "positions": 128}, seed=seed).build((length,), 2)
                flagged += bool(inspect_model(built.module, ids))
                served = Decepticons(built.module, ThreatModel(server="malicious"), seed=seed).serve(
                    built.module, (length,), public)
                detected += bool(inspect_model(served, ids))
            print(f"| {name} | {size} | {flagged} of {n} | {detected} of {n} |", flush=True)
        lora = sum(bool(inspect_model(ModelSpec(name, {**sizes[1], "lora_rank": 8}, seed=s).build((length,), 2).module,
                                      ids)) for s in range(seeds))
        print(f"| {name}, LoRA rank 8 | {sizes[1]} | {lora} of {seeds} | (refused: only adapters train) |", flush=True)
    print(f"| gpt2 trained (LAMP's prior, train topics) | width 64, 2 layers | "
          f"{int(bool(inspect_model(language_prior(), ids)))} of 1 | - |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["gpt2", "gpt2-classifier"])
    parser.add_argument("--attacks", nargs="+", default=["dager", "decepticons"])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--length", type=int, default=32)
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--inspection", action="store_true")
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path("runs/decepticons.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if args.inspection:
        inspection(args.seeds, args.length)
        return
    rows = json.loads(args.out.read_text()) if args.out.exists() else []
    done = {(r["model"], r["attack"], r["batch"], r["length"], r["width"], r["layers"]) for r in rows}
    for model in args.models:
        for batch in args.batches:
            for attack in args.attacks:
                if (model, attack, batch, args.length, args.width, args.layers) in done:
                    continue
                row = cell(model, attack, batch, args.length, args.width, args.layers)
                rows.append(row)
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(json.dumps(rows, indent=1))
                print(json.dumps(row), flush=True)
    print("\n| model | batch x length | attack | ROUGE-1 % | ROUGE-2 % | token acc. % | positions 0..n-2 % "
          "| exact sequences | s (serve + attack) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if r.get("refused"):
            outcome = "refused | - | - | - | -"
        else:
            exact = round(r["exact_rate"] * r["batch"])
            outcome = (f"{100 * r['rouge1']:.1f} | {100 * r['rouge2']:.1f} | {100 * r['token_accuracy']:.1f} | "
                       f"{100 * r['prefix_accuracy']:.1f} | {exact} / {r['batch']}")
        print(f"| {r['model']} | {r['batch']} x {r['length']} | {r['attack']} | {outcome} | "
              f"{round(r['serve_s'] + r['attack_s'], 1)} |")


if __name__ == "__main__":
    main()
