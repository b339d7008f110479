"""The long fuzzing campaign over update files alone (the suite runs 3,000 of these).

    .venv/bin/python benchmarks/fuzz_updates.py --n 20000 --seed 0

The same as `benchmarks/fuzz_surfaces.py --surface updates`. Counts: docs/hardening.md.
"""

from gradleak.fuzz import main

if __name__ == "__main__":
    import sys

    raise SystemExit(main(["--surface", "updates", *sys.argv[1:]]))
