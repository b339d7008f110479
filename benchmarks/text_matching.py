"""TAG and LAMP beside the span attack on a BERT classifier (width 256, 4 layers, 4 heads, random
init, float32), batch 1 and 4 of 16-token held-out sequences; and the bag of words at batch 64 on
BERT-base and GPT-2-small sizes (classification heads: the embedding is trained and untied) and on
the untied GPT-2 language model.

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/text_matching.py [--iterations 500]
        [--attacks dager,tag,lamp,bag-of-words] [--dtype float32]

Prints two markdown tables (docs/text.md); ``--attacks`` picks rows (the bag of words is the second
table), ``--dtype float64`` builds the BERT classifier in float64.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402


def main() -> None:
    from gradleak.client import ClientSetup
    from gradleak.errors import AttackNotApplicable
    from gradleak.models import ModelSpec
    from gradleak.pipeline import make_attack
    from gradleak.text import load_text, load_tokenizer
    from gradleak.text.metrics import score_text
    from gradleak.text.pipeline import text_updates
    from gradleak.threat import ThreatModel

    parser = argparse.ArgumentParser()
    parser.add_argument("--iterations", type=int, default=500)
    parser.add_argument("--swaps", type=int, default=50)
    parser.add_argument("--attacks", default="dager,tag,lamp,bag-of-words")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    args = parser.parse_args()
    chosen = set(args.attacks.split(","))
    torch.set_num_threads(1)
    tokenizer = load_tokenizer()
    print("| batch | attack | ROUGE-1 | ROUGE-2 | token accuracy | exact seq. | s / update |\n|---|---|---|---|---|---|---|")
    spec = ModelSpec("bert", {"width": 256, "layers": 4, "heads": 4, "positions": 64}, dtype=args.dtype)
    built = spec.build((16,), 2)
    for batch in (1, 4):
        data = load_text(n=batch, length=16)
        (served,) = text_updates(built, data.ids, data.labels, ClientSetup(batch_size=batch), None, tokenizer)
        for name, options in (("dager", {}), ("tag", {"iterations": args.iterations}),
                              ("lamp", {"iterations": args.iterations, "swaps": args.swaps})):
            if name not in chosen:
                continue
            attack = make_attack(name, built.module, ThreatModel(), options)
            started = time.perf_counter()
            try:
                result = attack.reconstruct(served.update)
            except AttackNotApplicable as error:
                print(f"| {batch} | {name} | refused: {error.condition} | | | | |")
                continue
            seconds = time.perf_counter() - started
            s = score_text(result.tokens, data.ids, tokenizer).summary
            dtype = "" if args.dtype == "float32" else f" ({args.dtype})"
            print(f"| {batch} | {name}{' ' + str(options) if options else ''}{dtype} | {100 * s['rouge1']:.1f} | "
                  f"{100 * s['rouge2']:.1f} | {100 * s['token_accuracy']:.1f} | {100 * s['exact_rate']:.0f} % | "
                  f"{seconds:.1f} |", flush=True)
    if "bag-of-words" not in chosen:
        return
    print("\n| model | batch x length | tokens in the batch | found | precision | recall | s / update |\n"
          "|---|---|---|---|---|---|---|")
    data = load_text(n=64, length=32)
    for name, options in (("bert", {}), ("gpt2-classifier", {}), ("gpt2", {"tie": False})):
        built = ModelSpec(name, {**options, "positions": 128} if name != "bert" else options).build((32,), 2)
        (served,) = text_updates(built, data.ids, data.labels, ClientSetup(batch_size=64), None, tokenizer)
        started = time.perf_counter()
        result = make_attack("bag-of-words", built.module, ThreatModel(), {}).reconstruct(served.update)
        seconds = time.perf_counter() - started
        s = score_text(result.tokens, data.ids, tokenizer).summary
        print(f"| {name}{' ' + str(options) if options else ''} | 64 x 32 | {len(set(data.ids.flatten().tolist()))} | "
              f"{result.tokens.numel()} | {100 * s['token_set_precision']:.1f} % | {100 * s['token_set_recall']:.1f} % | "
              f"{seconds:.2f} |", flush=True)


if __name__ == "__main__":
    main()
