"""Which images of a batch an update carries, and what the attack recovers of each (trained networks).

    python benchmarks/trained_grid.py attack --data digits --batches 4 --n 16 --no-photos
    python benchmarks/trained_grid.py attack --data digits --batches 4 --n 16 --no-photos \\
        --attack-options '{"as_batch": 1}' --tag as1
    python benchmarks/batch_shares.py --data digits [--tags default as1]

Reads ``trained_grid``'s logs of eval-mode batches (each row records every original's share of the
client's update and the share of the reconstruction matched to it, ``gradleak.shares``) and prints,
per network: how many images carry their update (share >= 1 %), the PSNR of those and of the rest,
whether the reconstruction's own shares (truth-free) point at the image that carries the update,
and, for a second tag that reconstructs fewer images than the batch (``as_batch``), which original
its images matched and at what PSNR. Writes ``batch-shares-<tags>.json`` beside the logs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import gradleak.shares  # noqa: E402
from trained_grid import RESULTS, rows_of  # noqa: E402  (a sibling script)

CARRIED = 0.01   # gradleak.shares.CARRIED_SHARE
ORDER = ("untrained", "sgd", "sgd-nowd", "adam", "adam-wd", "fedavg")


def _mean(values: list[float]) -> float | None:
    return statistics.fmean(values) if values else None


def _argmax(values: list[float | None]) -> int | None:
    known = [(v, i) for i, v in enumerate(values) if v is not None]
    return max(known)[1] if known else None


def mixture_parts(row: dict) -> list[float | None] | None:
    """Per original, the part of the fitted mixture (``mixture="fitted"``'s note; truth-free) of the
    reconstruction matched to it; None for a row without that note."""
    parts = gradleak.shares.mixture_parts(row.get("notes", []), len(row["matched_to"]))
    if parts is None:
        return None
    return [None if m is None else parts[m] for m in row["matched_to"]]


def summarise(rows: list[dict], fewer: list[dict] | None = None) -> dict:
    """One network's batches (``rows``: a full reconstruction per batch; ``fewer``: the same batches
    reconstructed with fewer images), as the module's notes describe."""
    carried, rest, dominant, identified, top_share, by_parts = [], [], [], 0, [], []
    for row in rows:
        shares, psnr = row["true_shares"], row["psnr"]
        for s, p in zip(shares, psnr):
            (carried if s >= CARRIED else rest).append(p)
        top = _argmax(shares)
        dominant.append(psnr[top])
        top_share.append(shares[top])
        identified += _argmax(row["reconstruction_shares"]) == top
        parts = mixture_parts(row)
        if parts is not None:
            by_parts.append(_argmax(parts) == top)
    out = {"batches": len(rows), "images": len(carried) + len(rest), "mean": _mean(carried + rest),
           "recognisable": sum(p >= 18 for p in carried + rest),
           "carried": len(carried), "psnr_carried": _mean(carried), "psnr_rest": _mean(rest),
           "dominant_psnr": _mean(dominant), "dominant_recognisable": sum(p >= 18 for p in dominant),
           "dominant_share_median": statistics.median(top_share) if top_share else None,
           "identified_truth_free": identified,
           "identified_by_mixture_parts": sum(by_parts) if by_parts else None}
    if fewer:
        by_key = {row["key"]: row for row in rows}
        hit, psnr = 0, []
        for row in fewer:
            full = by_key.get(row["key"])
            matched = [i for i, m in enumerate(row["matched_to"]) if m is not None]
            if full is None or not matched:
                continue
            hit += _argmax(full["true_shares"]) in matched
            psnr += [row["psnr"][i] for i in matched]
        out.update(fewer_batches=len(fewer), fewer_matched_dominant=hit, fewer_psnr=_mean(psnr),
                   fewer_images=len(psnr), fewer_recognisable=sum(p >= 18 for p in psnr))
    return out


SHARE_NAMED = 0.1   # an image of a reconstruction holding >= 10 % of its re-simulated update is attacked alone


def named_by_shares(row: dict) -> int:
    """How many images the full reconstruction's own shares (truth-free) put at >= 10 % of the update: the ``k`` of
    ``carried=k`` (at least 1)."""
    return max(1, sum(v is not None and v >= SHARE_NAMED for v in row["reconstruction_shares"]))


def fewer_rows(folder: Path, full: list[dict], template: str) -> list[dict]:
    """Per full batch, the row of ``template`` with ``{k}`` = :func:`named_by_shares` (``as{k}+as{k}-flat``)."""
    cache: dict[int, dict] = {}
    out = []
    for row in full:
        k = named_by_shares(row)
        if k >= row["batch"]:   # every image carries the update: the full reconstruction is the attack
            out.append(row)
            continue
        if k not in cache:
            cache[k] = {r["key"]: r for r in _rows(folder, template.format(k=k), batches_only=False)}
        if row["key"] in cache[k]:
            out.append(cache[k][row["key"]])
    return out


def _rows(folder: Path, tag: str, batches_only: bool = True) -> list[dict]:
    """Eval-mode batches logged under ``tag`` (``A+B``: per batch the variant of lower matching loss, as
    ``trained_grid table`` chooses) that recorded their shares."""
    return [r for r in rows_of(folder, tag) if r["mode"] == "eval" and r["batch"] > 1
            and (r.get("true_shares") or not batches_only)]


def _fmt(value, spec=".1f") -> str:
    return "" if value is None else format(value, spec)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default="digits")
    parser.add_argument("--model", default="convnet")
    parser.add_argument("--options", default='{"width": 16}')
    parser.add_argument("--tags", nargs="+", default=["default", "as1"], help="a full reconstruction's tag, then "
                        "optionally one that reconstructs fewer images than the batch (A+B: the lower matching loss; {k}: per batch "
                        "the number of images the full reconstruction's shares put at >= 10 %%)")
    args = parser.parse_args()
    options = "-".join(f"{k}{v}" for k, v in json.loads(args.options).items())
    folder = RESULTS / f"{args.data}-{args.model}{'-' + options if options else ''}"
    full = _rows(folder, args.tags[0])
    fewer = [] if len(args.tags) < 2 else fewer_rows(folder, full, args.tags[1]) if "{k}" in args.tags[1] else \
        _rows(folder, args.tags[1])
    nets = [n for n in ORDER if any(r["net"] == n for r in full)]
    result = {n: summarise([r for r in full if r["net"] == n], [r for r in fewer if r["net"] == n]) for n in nets}
    print("| network | images | mean PSNR, >= 18 dB | carried (share >= 1 %) | PSNR carried / rest | the dominant image: "
          "PSNR, >= 18 dB, median share | found by the reconstruction's shares | fewer images (carried): PSNR, "
          ">= 18 dB of the images returned, batches where they include the dominant | found by the mixture's parts |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for net, s in result.items():
        by_parts = s["identified_by_mixture_parts"]
        parts = "" if by_parts is None else f"{by_parts}/{s['batches']}"
        one = (f"{_fmt(s.get('fewer_psnr'))}, {s.get('fewer_recognisable')} of {s.get('fewer_images')}, "
               f"{s.get('fewer_matched_dominant')}/{s.get('fewer_batches')}") if s.get("fewer_batches") else ""
        print(f"| {net} | {s['images']} | {_fmt(s['mean'])}, {s['recognisable']} | {s['carried']} | {_fmt(s['psnr_carried'])} / "
              f"{_fmt(s['psnr_rest'])} | {_fmt(s['dominant_psnr'])}, {s['dominant_recognisable']}/{s['batches']}, "
              f"{_fmt(s['dominant_share_median'], '.4f')} | {s['identified_truth_free']}/{s['batches']} | {one} | {parts} |")
    out = folder / f"batch-shares-{'+'.join(args.tags)}.json"
    out.write_text(json.dumps(result, indent=1))
    print(f"\nwritten: {out}")


if __name__ == "__main__":
    main()
