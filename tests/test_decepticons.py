"""Decepticons (a malicious server corrupting a transformer's parameters) and the client's
inspection of the transformer it receives. Tiny models (width 96-128, 2-3 layers), held-out
sentences; the public text the server places its bins on is the corpus's train topics."""

from __future__ import annotations

import pytest
import torch

from gradleak.client import ClientSetup, fedsgd_update
from gradleak.errors import AttackNotApplicable, ConfigError
from gradleak.models import ModelSpec
from gradleak.text import load_text, load_tokenizer
from gradleak.text.metrics import score_text
from gradleak.threat import ThreatModel

TINY = {"width": 96, "layers": 2, "heads": 2, "positions": 64}
MALICIOUS = ThreatModel(server="malicious")


def tiny(name="gpt2", dtype="float64", length=12, **options):
    return ModelSpec(name, {**TINY, **options}, dtype=dtype).build((length,), 2)


def served_update(built, data, **options):
    from gradleak.attacks import Decepticons

    attack = Decepticons(built.module, MALICIOUS, **options)
    public = load_text("corpus-train", n=32, length=data.ids.shape[1]).ids
    served = attack.serve(built.module, (data.ids.shape[1],), public)
    target = data.ids if built.loss == "causal_lm" else data.labels
    return attack, served, fedsgd_update(served, data.ids, target, loss=built.loss, model_info=built.description())


def test_each_bin_holds_one_tokens_input_exactly_and_a_causal_lm_batch_comes_back(tmp_path):
    from gradleak.attacks import Decepticons
    from gradleak.attacks._decepticons_model import block_paths
    from gradleak.attacks.decepticons import bin_inputs
    from gradleak.text.arch import TransformerView
    from gradleak.update_file import load_update, save_update

    built, data = tiny(), load_text(n=4, length=12)
    original = {n: p.clone() for n, p in built.module.named_parameters()}
    attack, served, update = served_update(built, data)
    assert all(torch.equal(p, original[n]) for n, p in built.module.named_parameters())   # the user's model untouched
    path = block_paths(TransformerView(served), 0)["fc_in"]
    seen = []
    handle = served.get_submodule(path).register_forward_hook(lambda m, i, o: seen.append(i[0].detach()))
    served(data.ids)
    handle.remove()
    truth = seen[0].reshape(-1, TINY["width"])
    vectors = bin_inputs(update.tensors[f"{path}.weight"], update.tensors[f"{path}.bias"], top=False)[0]
    error = (vectors[:, None] - truth[None]).norm(dim=-1).min(1).values / vectors.norm(dim=1)
    alone = error < 1e-10                                                  # closed form: float64 precision
    assert int(alone.sum()) >= 15 and bool((alone | (error > 1e-3)).all())  # else a mixture, far from every input
    result = attack.reconstruct(update)
    scores = score_text(result.tokens, data.ids, load_tokenizer()).summary
    assert scores["exact_rate"] == 1.0, result.notes
    assert any(n.startswith("last tokens of 4 of 4 sequences from their own bins") for n in result.notes)
    from dataclasses import replace

    clipped = attack.reconstruct(replace(update, tensors={n: 0.25 * t for n, t in update.tensors.items()}))
    assert torch.equal(clipped.tokens, result.tokens)          # the update's scale is fitted: 0.25 x the gradient
    assert any("(the update is 0.25 x the gradient" in n for n in clipped.notes)
    # the captured file alone (the weights it carries are the served ones) is attacked the same way
    again = Decepticons(built.module, MALICIOUS).reconstruct(load_update(save_update(update, tmp_path / "u.safetensors")))
    assert torch.equal(again.tokens, result.tokens)


def test_an_encoder_and_a_classifier_come_back_in_float32_at_a_batch_past_the_span_attacks_reach():
    tokenizer = load_tokenizer()
    bert, data = tiny("bert", layers=3), load_text(n=4, length=12)
    attack, _, update = served_update(bert, data)
    assert score_text(attack.reconstruct(update).tokens, data.ids, tokenizer).summary["exact_rate"] == 1.0
    # 16 x 12 = 192 positions >= d = 96: the span attack refuses; two tokens sharing a bin are told apart
    classifier, data = tiny("gpt2-classifier", dtype="float32", layers=3), load_text(n=16, length=12, start=8)
    attack, _, update = served_update(classifier, data)
    result = attack.reconstruct(update)
    assert score_text(result.tokens, data.ids, tokenizer).summary["token_accuracy"] > 0.9, result.notes
    assert "told apart" in result.notes[0]


def test_the_analyser_predicts_what_a_malicious_server_gets():
    from gradleak.text.analysis import text_analysis

    report = text_analysis(tiny("gpt2-classifier", layers=3).module, 12, 16, "cross_entropy")
    (row,) = report.malicious
    assert row.attack == "decepticons" and row.exact and "about 149.6 of 192 tokens alone in one of its 766 bins" in \
        row.reason                                                  # 192 (1 - 1/766)^191; measured: above
    assert "a malicious server: exact recovery by decepticons" in report.summary
    assert not text_analysis(tiny(lora_rank=4).module, 12, 1, "causal_lm").malicious[0].applies


def test_conditions_are_refused_in_one_line():
    from gradleak.attacks import Decepticons

    built, data = tiny(), load_text(n=2, length=12)
    with pytest.raises(AttackNotApplicable, match="server='malicious'"):
        Decepticons(built.module).serve(built.module, (12,), None)
    honest = fedsgd_update(built.module, data.ids, data.ids, loss="causal_lm")
    with pytest.raises(AttackNotApplicable, match="not the one decepticons serves"):
        Decepticons(built.module, MALICIOUS).reconstruct(honest)
    with pytest.raises(AttackNotApplicable, match="LoRA"):
        Decepticons(tiny(lora_rank=4).module, MALICIOUS).serve(tiny(lora_rank=4).module, (12,), None)
    with pytest.raises(AttackNotApplicable, match="2 or more blocks"):
        one = tiny("bert", layers=1)
        Decepticons(one.module, MALICIOUS).serve(one.module, (12,), None)
    with pytest.raises(ConfigError, match="token ids"):
        Decepticons(built.module, MALICIOUS).serve(built.module, (12,), torch.rand(4, 12))
    with pytest.raises(AttackNotApplicable, match="no room"):
        Decepticons(built.module, MALICIOUS, sentence_dims=60, position_dims=30).serve(built.module, (12,), None)


def test_inspection_refuses_the_corrupted_transformer_and_no_honest_one(tmp_path):
    from gradleak.defenses.inspection import inspect_model
    from gradleak.text.pipeline import attack_text

    ids = load_text(n=4, length=12).ids
    for name, options in (("gpt2", {}), ("gpt2-classifier", {}), ("bert", {}), ("gpt2", {"lora_rank": 4}),
                          ("bert", {"width": 128, "layers": 3, "heads": 4})):
        for seed in range(2):
            honest = ModelSpec(name, {**TINY, **options}, seed=seed).build((12,), 2)
            assert inspect_model(honest.module, ids) == [], (name, options, seed)
    model = ModelSpec("gpt2", TINY, dtype="float64")
    run = attack_text("decepticons", tmp_path / "run", n=4, length=12, model=model, client=ClientSetup(batch_size=4),
                      quiet=True)
    assert run.scores.summary["exact_rate"] == 1.0
    import json

    assert json.loads((tmp_path / "run" / "config.json").read_text())["threat_model"]["id"] == "G"
    with pytest.raises(AttackNotApplicable, match="refused to train on it: block 0's feed-forward layer: 384 of 384 "
                                                  "units measure the same direction"):
        attack_text("decepticons", tmp_path / "refused", n=4, length=12, model=model,
                    client=ClientSetup(batch_size=4), defenses=["inspect-model"], quiet=True)
