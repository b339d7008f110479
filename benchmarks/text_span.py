"""The span attack (``dager``) on a GPT-2-small-sized decoder (d = 768, 12 layers, 12 heads,
random init, built-in vocabulary of 3,223 tokens), causal-LM FedSGD updates of held-out
sentences of the built-in corpus: ROUGE-1/2, token accuracy, exact-sequence rate and the
seconds per update, per cell of batch x length; with ``--lora R`` the client trains LoRA
adapters of rank R only; with ``--noise V`` the update carries Gaussian noise of variance V.
Beside each cell, the analyser's prediction (``gradleak.text.analysis.span_condition``).

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/text_span.py --out runs/text-span.json
    ... --batches 1 4 16 --lengths 16 32 --lora 64
    ... --batches 1 --lengths 16 --noise 1e-8 1e-6 1e-4

One torch thread; each cell is one client update; cells already in ``--out`` are skipped (rerun
to resume). Prints a markdown table (docs/text.md).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402


def cell(batch: int, length: int, lora: int | None, noise: float | None, width: int, layers: int, dtype: str,
         options: dict) -> dict:
    from gradleak.attacks import SpanAttack
    from gradleak.client import ClientSetup
    from gradleak.errors import AttackNotApplicable
    from gradleak.models import ModelSpec
    from gradleak.text import load_text, load_tokenizer
    from gradleak.text.analysis import span_condition
    from gradleak.text.metrics import score_text
    from gradleak.text.pipeline import text_updates

    model_options = {"width": width, "layers": layers, "heads": max(1, width // 64), "positions": 128}
    if lora:
        model_options["lora_rank"] = lora
    built = ModelSpec("gpt2", model_options, dtype=dtype).build((length,), 2)
    tokenizer = load_tokenizer()
    data = load_text(n=batch, length=length)                       # held-out topics
    defenses = [f"gaussian:variance={noise}"] if noise else None
    started = time.perf_counter()
    (served,) = text_updates(built, data.ids, data.labels, ClientSetup(batch_size=batch), defenses, tokenizer)
    client_s = time.perf_counter() - started
    prediction = span_condition(built.module, batch, length, "causal_lm")
    row = {"batch": batch, "length": length, "lora": lora, "noise": noise, "width": width, "layers": layers,
           "dtype": dtype, "client_s": round(client_s, 2), "predicted_exact": prediction["exact"],
           "positions": prediction["positions"], "capacity": prediction["capacity"]}
    from gradleak.text.arch import TransformerView

    view = TransformerView(built.module)
    matrix, _ = view.projection_gradient(served.update.tensors, dict(built.module.named_parameters()), 0)
    values = torch.linalg.svdvals(matrix.double())
    row["measured_rank"] = int((values > values[0] * 1e-5).sum())   # block 0's gradient, as measured
    row["space"] = int(matrix.shape[0])
    started = time.perf_counter()
    try:
        result = SpanAttack(built.module, **options).reconstruct(served.update)
    except AttackNotApplicable as error:
        row.update(attack_s=round(time.perf_counter() - started, 2), refused=str(error), rouge1=0.0, rouge2=0.0,
                   token_accuracy=0.0, exact_rate=0.0)
        return row
    row["attack_s"] = round(time.perf_counter() - started, 2)
    row.update(score_text(result.tokens, data.ids, tokenizer).summary)
    row["approximate"] = any("APPROXIMATE" in n for n in result.notes)
    row["candidates_max"] = max(result.history["candidates per position"])
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--lengths", type=int, nargs="+", default=[16, 32, 64])
    parser.add_argument("--lora", type=int, nargs="*", default=[None])
    parser.add_argument("--noise", type=float, nargs="*", default=[None])
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--tolerance", type=float, default=None)
    parser.add_argument("--out", type=Path, default=Path("runs/text-span.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    rows = json.loads(args.out.read_text()) if args.out.exists() else []
    done = {(r["batch"], r["length"], r["lora"], r["noise"], r["width"], r["layers"], r["dtype"]) for r in rows}
    options = {} if args.tolerance is None else {"tolerance": args.tolerance}
    for lora in args.lora:
        for noise in args.noise:
            for length in args.lengths:
                for batch in args.batches:
                    key = (batch, length, lora, noise, args.width, args.layers, args.dtype)
                    if key in done:
                        continue
                    row = cell(batch, length, lora, noise, args.width, args.layers, args.dtype, options)
                    rows.append(row)
                    args.out.parent.mkdir(parents=True, exist_ok=True)
                    args.out.write_text(json.dumps(rows, indent=1))
                    print(json.dumps(row), flush=True)
    print("\n| LoRA | noise var | batch x length | positions / capacity | predicted | measured rank | ROUGE-1 | ROUGE-2 "
          "| exact seq. | s / update |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        outcome = "refused" if r.get("refused") else f"{100 * r['rouge1']:.1f} | {100 * r['rouge2']:.1f} | " \
                                                     f"{100 * r['exact_rate']:.0f} %"
        if r.get("refused"):
            outcome = "refused | - | -"
        rank = f"{r['measured_rank']} / {r['space']}" if "measured_rank" in r else "-"
        print(f"| {r['lora'] or '-'} | {r['noise'] or '-'} | {r['batch']} x {r['length']} | {r['positions']} / "
              f"{r['capacity']} | {'exact' if r['predicted_exact'] else 'fails'} | {rank} | {outcome} | "
              f"{r['attack_s']} |")


if __name__ == "__main__":
    main()
