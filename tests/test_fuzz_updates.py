"""The fuzz test: thousands of hostile update files, each loaded fully valid or refused in one line.

The long campaign (>= 10,000 inputs) is `python benchmarks/fuzz_updates.py`; its counts are in
docs/hardening.md.
"""

from __future__ import annotations

from gradleak.fuzz import KINDS, run_campaign


def test_every_hostile_update_file_loads_valid_or_is_refused_in_one_line(tmp_path):
    campaign = run_campaign(tmp_path / "fuzz", 3000, seed=20261201)
    assert campaign.total == 3000
    assert campaign.escaped == [], campaign.escaped[:5]        # nothing but GradleakError ever escapes
    assert campaign.multiline == [], campaign.multiline[:5]    # every refusal is one line
    assert campaign.unusable == [], campaign.unusable[:5]      # what loads is what it claims to be
    assert not campaign.pickle_ran                             # no pickle payload ever ran
    assert campaign.slowest < 2.0                              # bounded time per input (typically < 40 ms)
    assert campaign.rss_growth_mb < 1024                       # bounded memory (no huge allocation)
    for kind in KINDS:                                         # the generator makes what it says, of every kind
        assert campaign.outcomes[(kind, "refused")] >= 250, kind
    # the re-signed semantic mutations include valid files (e.g. float64 tensors): the loading path is exercised
    assert campaign.outcomes[("metadata", "loaded")] + campaign.outcomes[("payload", "loaded")] > 0
