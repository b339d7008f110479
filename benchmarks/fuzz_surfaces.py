"""The long fuzzing campaign over every untrusted-input surface (the suite runs a seeded sample).

    .venv/bin/python benchmarks/fuzz_surfaces.py --n 10000 --seed 0 [--surface weights] [--json out.json]

Per surface (update files, weights files, model factories, audit configs, `gradleak train`
command lines): inputs, clean refusals, valid loads, escapes, multi-line messages, side effects
(a pickle that ran, a module imported without --allow-import, a refused command that wrote),
the slowest input and the peak memory growth. Exits non-zero if anything escaped. Counts:
docs/hardening.md.
"""

from gradleak.fuzz import main

if __name__ == "__main__":
    raise SystemExit(main())
