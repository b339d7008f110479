"""Text: the built-in corpus and tokenizer, text models, text clients, the span attack (DAGER)
and the text metrics. Tiny models (width 64-128, 2-3 layers); GPT-2-small sizes only in the
slow test and in benchmarks/text_span.py."""

from __future__ import annotations

import pytest
import torch

from gradleak.client import ClientSetup, client_update, fedsgd_update
from gradleak.errors import AttackNotApplicable, ConfigError, DataError
from gradleak.models import ModelSpec, check_description
from gradleak.text import builtin_sentences, held_out_topics, load_text, load_tokenizer
from gradleak.text.metrics import score_text
from gradleak.update_file import load_update, save_update

TINY = {"width": 96, "layers": 2, "heads": 2, "positions": 64}


def tiny(name="gpt2", dtype="float64", length=12, **options):
    return ModelSpec(name, {**TINY, **options}, dtype=dtype).build((length,), 2)


def update_of(built, data, **kwargs):
    target = data.ids if built.loss == "causal_lm" else data.labels
    return fedsgd_update(built.module, data.ids, target, loss=built.loss, model_info=built.description(), **kwargs)


# ------------------------------------------------------------------ corpus and tokenizer
def test_held_out_topics_never_meet_the_train_split():
    train, held = builtin_sentences("train"), builtin_sentences("held-out")
    assert {t for t, _ in train}.isdisjoint({t for t, _ in held})
    assert len(held) > 150 and len(train) > 4 * len(held) // 2
    topics = sorted({t for t, _ in builtin_sentences("all")})
    assert held_out_topics(topics) == held_out_topics(list(reversed(topics)))   # no RNG, no order


def test_sequences_are_real_held_out_text_of_the_length_asked():
    tokenizer = load_tokenizer()
    data = load_text(n=6, length=20)
    assert data.ids.shape == (6, 20) and data.ids.dtype == torch.int64
    held = " ".join(s for _, s in builtin_sentences("held-out"))
    for text in data.texts:
        assert text.split()[0] in held and len(text.split()) >= 5
    sentence = builtin_sentences("held-out")[0][1]
    assert tokenizer.decode(tokenizer.encode(sentence).ids) == sentence           # byte-level BPE is lossless
    assert len({tuple(r) for r in data.ids.tolist()}) == 6                          # no two sequences alike


def test_local_text_file_one_sequence_per_line(tmp_path):
    path = tmp_path / "mine.txt"
    path.write_text("1\tThe quick brown fox jumps over the lazy dog near the river bank today.\nshort\n"
                    "Every line holds one sequence of the client, cut to the length asked for.\n", encoding="utf-8")
    data = load_text(path, n=2, length=8)
    assert data.labels.tolist() == [1, 0] and data.ids.shape == (2, 8)
    assert data.texts[0].startswith("The quick")
    with pytest.raises(DataError, match="2 sequences of at least 8 tokens; asked for 3"):
        load_text(path, n=3, length=8)
    with pytest.raises(DataError, match="no such file"):
        load_text(tmp_path / "missing.txt")


# ------------------------------------------------------------------ models
def test_text_models_from_the_zoo_and_from_a_save_pretrained_folder(tmp_path):
    built = tiny("gpt2", dtype="float32")
    assert built.loss == "causal_lm" and built.module.task == "causal-lm"
    ids = load_text(n=2, length=12).ids
    assert built.module(ids).shape == (2, 12, load_tokenizer().get_vocab_size())
    assert tiny("bert").loss == "cross_entropy" and tiny("bert").module(ids).shape == (2, 2)
    built.module.net.save_pretrained(tmp_path / "lm")
    assert any((tmp_path / "lm").glob("*.safetensors"))
    mine = ModelSpec(f"hf:{tmp_path / 'lm'}", dtype="float32").build((12,))
    assert mine.loss == "causal_lm"
    assert torch.equal(mine.module(ids), built.module(ids))
    with pytest.raises((ConfigError, DataError), match="does not exist"):
        ModelSpec(f"hf:{tmp_path / 'nothing'}").build((12,))
    # an update file's description of a text model is checked on the meta device (sequence length, not C,H,W)
    shapes = {n: tuple(p.shape) for n, p in built.module.named_parameters()}
    assert check_description(built.description(), shapes)["input_shape"] == (12,)


def test_gpt2_small_sizes_build_on_the_meta_device():
    from gradleak.models import parameter_shapes

    shapes = parameter_shapes("gpt2", (32,), 2)      # the defaults are GPT-2 small: d = 768, 12 layers
    total = sum(torch.Size(s).numel() for s in shapes.values())
    assert shapes["net.transformer.wte.weight"][1] == 768 and len([n for n in shapes if n.endswith("ln_1.weight")]) == 12
    assert 85e6 < total < 124.5e6                     # GPT-2 small less the smaller vocabulary


# ------------------------------------------------------------------ clients
def test_fedsgd_causal_lm_gradient_is_the_language_models_own_loss_gradient():
    built = tiny("gpt2")
    data = load_text(n=3, length=12)
    update = update_of(built, data)
    net = built.module.net
    net.zero_grad()
    net(input_ids=data.ids, labels=data.ids).loss.backward()   # transformers' own shifted next-token loss
    for name, param in net.named_parameters():
        # transformers computes its loss in float32 (logits.float()): agreement to float32 precision
        torch.testing.assert_close(update.tensors[f"net.{name}"], param.grad, rtol=1e-4, atol=1e-7)
    assert update.labels is None and update.input_shape == (12,) and not update.buffers
    with pytest.raises(ConfigError, match="never shares"):
        fedsgd_update(built.module, data.ids, data.ids, loss="causal_lm", share_labels=True)


def test_lora_update_holds_only_the_adapters_and_survives_its_file(tmp_path):
    built = tiny("gpt2", lora_rank=4)
    data = load_text(n=2, length=12)
    update = update_of(built, data)
    assert update.tensors and all(".lora_A." in n or ".lora_B." in n for n in update.tensors)
    assert len(update.tensors) == 2 * TINY["layers"]
    path = save_update(update, tmp_path / "u.safetensors")
    back = load_update(path)
    assert back.loss == "causal_lm" and back.model["kwargs"]["lora_rank"] == 4
    assert all(torch.equal(back.tensors[n], update.tensors[n]) for n in update.tensors)
    delta = client_update(built.module, data.ids, data.ids, ClientSetup("fedavg", 2, lr=0.5, local_steps=3),
                          loss="causal_lm")
    assert delta.kind == "delta" and set(delta.tensors) == set(update.tensors)


# ------------------------------------------------------------------ the span attack
def test_dager_recovers_a_causal_lm_batch_exactly():
    from gradleak.attacks import SpanAttack

    built = tiny("gpt2", width=128)
    data = load_text(n=4, length=12)
    result = SpanAttack(built.module).reconstruct(update_of(built, data))
    scores = score_text(result.tokens, data.ids, load_tokenizer()).summary
    assert scores["exact_rate"] == 1.0 and scores["rouge1"] == 1.0 and scores["rouge2"] == 1.0
    assert any("last tokens from the final LayerNorm" in n for n in result.notes)


def test_dager_float32_and_encoder_and_lora():
    from gradleak.attacks import SpanAttack

    data = load_text(n=1, length=12)
    tokenizer = load_tokenizer()
    for name, options in (("gpt2", {"dtype": "float32"}), ("bert", {}), ("gpt2", {"lora_rank": 16})):
        built = tiny(name, **options)
        result = SpanAttack(built.module).reconstruct(update_of(built, data))
        scores = score_text(result.tokens, data.ids, tokenizer).summary
        positions = 11 if (name == "gpt2" and "lora_rank" in options) else 12   # LoRA: no final-LayerNorm gradient
        assert scores["token_accuracy"] == positions / 12, (name, options, result.notes)


def test_dager_under_noise_degrades_and_says_so():
    from gradleak.attacks import SpanAttack
    from gradleak.text.pipeline import text_updates

    built = tiny("gpt2", dtype="float32", width=128)
    data = load_text(n=2, length=12)
    tokenizer = load_tokenizer()
    rouge = {}
    for variance in (1e-12, 1e-4):
        (served,) = text_updates(built, data.ids, data.labels, ClientSetup(batch_size=2),
                                 [f"gaussian:variance={variance}"], tokenizer)
        result = SpanAttack(built.module).reconstruct(served.update)
        assert any(n.startswith("APPROXIMATE") for n in result.notes)
        rouge[variance] = score_text(result.tokens, data.ids, tokenizer).summary["rouge1"]
    assert rouge[1e-12] == 1.0 and rouge[1e-4] < 0.5


def test_dager_refuses_when_the_span_fills_the_space():
    from gradleak.attacks import SpanAttack

    built = tiny("gpt2", width=64)
    data = load_text(n=16, length=12)                 # 16 x 11 = 176 positions >= d = 64, and as many distinct
    with pytest.raises(AttackNotApplicable, match="176 input positions .* full rank|of 3223 tokens lie in the span"):
        SpanAttack(built.module).reconstruct(update_of(built, data))
    lora = tiny("gpt2", lora_rank=8)                  # LoRA rank 8: 11 positions >= 8
    with pytest.raises(AttackNotApplicable, match="LoRA adapters"):
        SpanAttack(lora.module).reconstruct(update_of(lora, load_text(n=1, length=12)))
    small = tiny("gpt2", width=128)                   # a FedAvg delta of 2 local steps sums spans at 2 weights
    text = load_text(n=4, length=12)
    delta = client_update(small.module, text.ids, text.ids, ClientSetup("fedavg", 4, lr=0.1, local_steps=2,
                                                                         local_batch_size=2), loss="causal_lm")
    with pytest.raises(AttackNotApplicable, match="2 local steps .* not the gradient of one batch"):
        SpanAttack(small.module).reconstruct(delta)


# ------------------------------------------------------------------ metrics
def test_text_scores_match_sequences_and_count_unrecovered_positions():
    tokenizer = load_tokenizer()
    truth = load_text(n=3, length=10).ids
    perfect = score_text(truth.flip(0), truth, tokenizer)
    assert perfect.summary["exact_rate"] == 1.0 and perfect.summary["rouge2"] == 1.0
    partial = truth.clone()
    partial[1, 4] = -1
    scores = score_text(partial, truth, tokenizer)
    assert scores.summary["exact_rate"] == pytest.approx(2 / 3)
    assert scores.per_sequence[1]["token_accuracy"] == pytest.approx(0.9)
    assert scores.per_sequence[1]["recovered_tokens"][4] == 0 and "\u25a1" in scores.per_sequence[1]["recovered"]
    assert score_text(truth[:1], truth, tokenizer).summary["n_recovered"] == 1


# ------------------------------------------------------------------ runs, files, CLI
def test_cli_attacks_simulated_text_clients_and_a_captured_text_update(tmp_path):
    import json

    from typer.testing import CliRunner

    from gradleak.cli import app

    model = ["--model", "gpt2", "-m", "width=96", "-m", "layers=2", "-m", "heads=2", "-m", "positions=64",
             "--dtype", "float64", "--length", "12", "--quiet"]
    runner = CliRunner()
    result = runner.invoke(app, ["attack", "-a", "dager", "--n", "4", "-c", "batch_size=2", "--out",
                                 str(tmp_path / "run"), *model], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["summary"]["exact_rate"] == 1.0 and metrics["summary"]["n_sequences"] == 4
    # truth-free: the recovered tokens re-simulate both clients' updates to float64 precision
    assert metrics["residual"]["updates"] == 2 and metrics["residual"]["certified"] == 2
    assert metrics["residual"]["max"] < 1e-10 and "2 recovered sequence(s)" in metrics["residual"]["per_update"][0]["reason"]
    page = (tmp_path / "run" / "report.html").read_text()
    assert "update residual (median; truth-free)" in page and "2 of 2 update(s)" in page
    # every token marked recovered (+1: the legend), none wrong or missing beyond the legend's own example
    assert page.count('class="ok"') == 4 * 12 + 1 and page.count('class="bad"') == page.count('class="miss"') == 1
    (tmp_path / "run" / "report.html").unlink()                        # gradleak report rebuilds a text run's page
    assert runner.invoke(app, ["report", str(tmp_path / "run")], catch_exceptions=False).exit_code == 0
    rebuilt = (tmp_path / "run" / "report.html").read_text()
    assert rebuilt.count('class="ok"') == 4 * 12 + 1 and "2 of 2 update(s)" in rebuilt
    from safetensors.torch import save_file

    save_file({"tokens": torch.full((1, 12), 10**6)}, str(tmp_path / "run" / "reconstruction.safetensors"))
    hostile = runner.invoke(app, ["report", str(tmp_path / "run")])
    assert hostile.exit_code == 2 and "outside [-1, 3223)" in hostile.output and len(hostile.output.splitlines()) == 1
    update, truth = tmp_path / "u.safetensors", tmp_path / "truth.safetensors"
    result = runner.invoke(app, ["capture", "--out", str(update), "--truth", str(truth), "--n", "3", "--start", "5",
                                 *model], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert load_update(update).extra["text"]["length"] == 12 and load_update(update).labels is None
    result = runner.invoke(app, ["attack", str(update), "-a", "dager", "--truth", str(truth), "--out",
                                 str(tmp_path / "file"), "--quiet"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "file" / "metrics.json").read_text())["summary"]
    assert summary["exact_rate"] == 1.0 and summary["n_sequences"] == 3
    result = runner.invoke(app, ["attack", str(update), "-a", "dager", "--out", str(tmp_path / "blind")],  # no truth
                           catch_exceptions=False)
    assert result.exit_code == 0 and "certified exact (truth-free)" in result.output
    assert "3 of 3 sequences carry their update" in result.output     # each sequence's share (gradleak.shares)
    blind = json.loads((tmp_path / "blind" / "metrics.json").read_text())
    assert "summary" not in blind and blind["residual"]["certified"] == 1 and blind["residual"]["median"] < 1e-5
    assert "Without ground truth" in (tmp_path / "blind" / "report.html").read_text()
    refused = runner.invoke(app, ["attack", "-a", "dager", "--n", "16", "-c", "batch_size=16", "--out",
                                  str(tmp_path / "no"), *model])                 # 16 x 11 = 176 >= d = 96
    assert refused.exit_code == 2 and ("176 input positions" in refused.output or "lie in the span" in refused.output)


def test_bag_of_words_is_the_exact_token_set_at_batch_64():
    from gradleak.attacks import BagOfWords

    data = load_text(n=64, length=16)
    tokenizer = load_tokenizer()
    built = tiny("bert", dtype="float32", width=64)
    result = BagOfWords(built.module).reconstruct(update_of(built, data))
    summary = score_text(result.tokens, data.ids, tokenizer).summary
    assert summary["token_set_precision"] == 1.0 and summary["token_set_recall"] == 1.0
    assert result.tokens.numel() == len(set(data.ids.flatten().tolist()))
    for refused, why in ((tiny("gpt2", width=64), "tied"), (tiny("bert", width=64, lora_rank=4), "no gradient")):
        with pytest.raises(AttackNotApplicable, match=why):
            BagOfWords(refused.module).reconstruct(update_of(refused, data))


def test_tag_and_lamp_run_through_the_engine_on_token_embeddings():
    from gradleak.attacks import LAMP, TAG
    from gradleak.attacks.matching import TAG_L1, gradient_distance

    a, b = {"w": torch.tensor([1.0, -2.0])}, {"w": torch.tensor([0.5, 0.0])}
    assert float(gradient_distance(a, b, ["w"], torch.ones(1), "l2+l1")) == pytest.approx(4.25 + TAG_L1 * 2.5)
    built = tiny("bert", dtype="float32", width=64)
    data = load_text(n=1, length=12)
    update = update_of(built, data)
    lamp = LAMP(built.module, iterations=300, lr=0.05, discrete_every=100, proposals=4,
                init_candidates=2).reconstruct(update)
    assert lamp.tokens.shape == (1, 12) and lamp.labels.tolist() == data.labels.tolist()
    assert lamp.tokens[0, 0] == data.ids[0, 0]        # the pooled first position is matched exactly
    assert any(n.startswith("discrete steps: 3 ") for n in lamp.notes)   # after 100, 200, 300 iterations
    tag = TAG(built.module, iterations=20).reconstruct(update)
    assert tag.tokens.shape == (1, 12) and any("l2+l1" in n for n in tag.notes)
    with pytest.raises(AttackNotApplicable, match="causal LM"):
        TAG(tiny("gpt2").module, iterations=2).reconstruct(update_of(tiny("gpt2"), data))


def test_freezing_the_embedding_stops_the_bag_of_words_only(tmp_path):
    from gradleak.text.pipeline import attack_text

    model = ModelSpec("bert", {**TINY, "width": 64}, dtype="float64")
    runs = {d: attack_text("bag-of-words", tmp_path / d, n=2, length=12, model=model,
                           client=ClientSetup(batch_size=2), defenses=None if d == "none" else [d], quiet=True)
            for d in ("none", "freeze")}
    assert runs["none"].scores.summary["token_set_recall"] == 1.0
    assert runs["freeze"].scores.summary["token_set_recall"] == 0.0
    gpt = ModelSpec("gpt2", {**TINY, "width": 128}, dtype="float64")
    frozen = attack_text("dager", tmp_path / "dager", n=2, length=12, model=gpt,
                         client=ClientSetup(batch_size=2), defenses=["freeze"], quiet=True)
    assert frozen.scores.summary["exact_rate"] == 1.0        # the attention layers still train
    clipped = attack_text("dager", tmp_path / "clipped", n=2, length=12, model=gpt, client=ClientSetup(batch_size=2),
                          defenses=["clipping:max_norm=0.01"], quiet=True)
    assert clipped.scores.summary["exact_rate"] == 1.0       # a span has no scale; the last tokens fit it
    assert any("x the gradient of the mean loss" in n for n in clipped.reconstruction.notes)


def test_text_audit_grid_refusals_and_resume(tmp_path):
    import csv

    from typer.testing import CliRunner

    from gradleak.cli import app

    config = tmp_path / "text.yaml"
    config.write_text(
        "modality: text\nname: tiny\ndata: {name: corpus, n: 12, length: 12}\n"
        "models:\n  - {name: gpt2, options: {width: 64, layers: 2, heads: 2, positions: 64}}\n"
        "  - {name: bert, options: {width: 64, layers: 2, heads: 2, positions: 64}}\n"
        "attacks: [dager, {name: bag-of-words, models: [bert]}]\ndefenses: [none, freeze]\nbatch_sizes: [1, 12]\n"
        "dtype: float64\n", encoding="utf-8")
    runner = CliRunner()
    result = runner.invoke(app, ["audit", str(config), "--out", str(tmp_path / "audit"), "--quiet"],
                           catch_exceptions=False)
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader((tmp_path / "audit" / "cells.csv").open()))
    assert len(rows) == 2 * 2 + 2 * 2 * 2                    # gpt2: dager; bert: dager + bag-of-words
    cell = {(r["model"], r["attack"], r["defense"], r["batch"]): r for r in rows}
    assert float(cell["gpt2", "dager", "none", "1"]["exact_rate"]) == 1.0
    assert cell["gpt2", "dager", "none", "1"]["predicted_exact"] == "True"
    assert cell["gpt2", "dager", "none", "12"]["status"] == "refused"          # 12 x 11 = 132 >= d = 64
    assert cell["gpt2", "dager", "none", "12"]["predicted_exact"] == "False"  # the analyser foresaw it
    assert float(cell["bert", "bag-of-words", "none", "12"]["token_set_recall"]) == 1.0
    assert float(cell["bert", "bag-of-words", "freeze", "12"]["token_set_recall"]) == 0.0
    stored = next((tmp_path / "audit" / "cells").glob("gpt2-dager-b1-*/cell.json"))
    before = stored.stat().st_mtime_ns
    assert runner.invoke(app, ["audit", str(config), "--out", str(tmp_path / "audit"), "--quiet"]).exit_code == 0
    assert stored.stat().st_mtime_ns == before                                  # stored cells are not rerun
    analysis = runner.invoke(app, ["analyze", "--model", "gpt2", "-m", "width=64", "-m", "heads=2", "--input-shape", "12",
                                   "--batch-size", "12", "--json"], catch_exceptions=False)
    import json

    rows = {r["attack"]: r for r in json.loads(analysis.output)["attacks"]}
    assert rows["dager"]["exact"] is False and "132 input positions >= the model width d = 64" in rows["dager"]["why"]
    assert rows["bag-of-words"]["applies"] is False


@pytest.mark.slow
def test_dager_on_gpt2_small_sizes_is_exact():
    from gradleak.attacks import SpanAttack

    built = ModelSpec("gpt2", {"positions": 64}).build((16,))        # d = 768, 12 layers, float32
    data = load_text(n=4, length=16, start=20)
    result = SpanAttack(built.module).reconstruct(update_of(built, data))
    assert score_text(result.tokens, data.ids, load_tokenizer()).summary["exact_rate"] == 1.0
