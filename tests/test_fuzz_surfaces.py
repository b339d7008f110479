"""The fuzz harness on every new door: hostile weights files, model factories, audit configs
(model names in every form) and ``gradleak train`` command lines, seeded. Each input loads fully
valid or is refused in one line; nothing else escapes; no pickle runs; no module is imported
without --allow-import; a refused command writes nothing. The long campaign (>= 10,000 inputs
per surface) is ``benchmarks/fuzz_surfaces.py``; its counts are in docs/hardening.md."""

from __future__ import annotations

import pytest

from gradleak.fuzz import run_surface
from gradleak.fuzz import configs, factories, train, weights

CASES = [("weights", 800, weights.KINDS, 3.0), ("factories", 500, factories.KINDS, 3.0),
         ("configs", 800, configs.KINDS, 5.0), ("train", 120, train.KINDS, 20.0)]


@pytest.mark.parametrize("surface, n, kinds, slowest", CASES, ids=[c[0] for c in CASES])
def test_every_hostile_input_loads_valid_or_is_refused_in_one_line(tmp_path, surface, n, kinds, slowest):
    campaign = run_surface(surface, tmp_path / surface, n, seed=20261202)
    assert campaign.total == n
    assert campaign.escaped == [], campaign.escaped[:5]          # nothing but a GradleakError (or exit 2)
    assert campaign.multiline == [], campaign.multiline[:5]      # every refusal is one line
    assert campaign.unusable == [], campaign.unusable[:5]        # what loads is what it claims to be
    assert campaign.side_effects == [], campaign.side_effects[:5]
    assert campaign.slowest < slowest, campaign.slowest_input    # a bound per input, not a benchmark
    for kind in kinds:                                           # the generator makes every kind it names
        assert campaign.outcomes[(kind, "refused")] + campaign.outcomes[(kind, "loaded")] >= n // len(kinds) - 1
    assert campaign.count("refused") > n // 2 and campaign.count("loaded") > 0   # both paths exercised
