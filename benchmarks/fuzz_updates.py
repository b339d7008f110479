"""The long fuzzing campaign over update files (the test suite runs 3,000 of these).

    .venv/bin/python benchmarks/fuzz_updates.py --n 20000 --seed 0

Prints, per mutation kind, how many inputs loaded (fully valid) and how many were refused,
the most common refusals, the slowest input and the memory growth; exits non-zero if any
input escaped with something other than a GradleakError, got a multi-line message, loaded
but was not usable with its model, or ran a pickle payload. Counts: docs/hardening.md.
"""

from gradleak.fuzz import main

if __name__ == "__main__":
    raise SystemExit(main())
