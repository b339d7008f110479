"""Train the language-model prior LAMP scores token swaps with (run once; the output is
committed): a tiny GPT-2 (width 64, 2 layers, 2 heads) trained on the *train* topics of the
built-in corpus only, saved as ``src/gradleak/text/assets/prior.safetensors`` (float16).

    OMP_NUM_THREADS=1 PYTHONPATH=src python scripts/train_text_prior.py

Prints the next-token loss on the train and the held-out topics (held-out is only measured).
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from gradleak.losses import causal_lm  # noqa: E402
from gradleak.models import ModelSpec  # noqa: E402
from gradleak.text import load_text  # noqa: E402
from gradleak.text.prior import PRIOR_OPTIONS  # noqa: E402


def main(steps: int = 3000, batch: int = 32, length: int = 32) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = ModelSpec("gpt2", {**PRIOR_OPTIONS, "dropout": 0.2}).build((length,)).module
    sequences = load_text("corpus-train", n=None, length=length).ids
    cut = int(0.9 * sequences.shape[0])   # the last tenth of the train topics' sequences: early stopping
    train, valid = sequences[:cut], sequences[cut:]
    held = load_text("corpus-heldout", n=None, length=length).ids          # measured once, never used to choose
    stream = train.flatten()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.1)
    started, best, best_state = time.perf_counter(), math.inf, None
    for step in range(steps):
        model.train()
        starts = torch.randint(0, stream.numel() - length, (batch,))
        ids = torch.stack([stream[s:s + length] for s in starts.tolist()])   # random windows of the train text
        loss = causal_lm(model(ids), ids)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 100 == 99:
            model.eval()
            with torch.no_grad():
                value = float(causal_lm(model(valid), valid))
            if value < best:
                best, best_state = value, {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(best_state[name])
    model.eval()
    with torch.no_grad():
        train_loss, held_loss = float(causal_lm(model(train), train)), float(causal_lm(model(held), held))
    from safetensors.torch import save_file

    save_file({n: p.detach().half() for n, p in model.named_parameters()},
              str(ROOT / "src" / "gradleak" / "text" / "assets" / "prior.safetensors"))
    print(f"{steps} steps in {time.perf_counter() - started:.0f} s; validation loss {best:.3f}; next-token loss "
          f"train {train_loss:.3f} "
          f"(perplexity {math.exp(train_loss):.1f}), held-out {held_loss:.3f} (perplexity {math.exp(held_loss):.1f}); "
          f"{train.shape[0]} train and {held.shape[0]} held-out sequences of {length} tokens")


if __name__ == "__main__":
    main()
