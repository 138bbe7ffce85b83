"""Scoring: the answer rules, teacher-forced vs generated exact match on a trained model, outputs."""
import json

import pytest
import torch

from remix_ds import metrics as M
from remix_ds.data.example import Example


pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------ answer rules

def test_study_exact_match_strips_and_lowercases():
    assert M.exact_match("  Paris \n", "paris")
    assert not M.exact_match("Paris, France", "Paris")
    assert M.score_example("Paris ", "paris", source="popqa")["correct"]


def test_webquestions_counts_a_prediction_contained_in_the_gold():
    for src in ("webquestions", "web_questions", "WebQ"):
        assert M.task_of(src) == M.CONTAINS
    assert M.score_example("Obama", "Barack Obama", source="webquestions")["correct"]
    assert not M.score_example("Barack Obama Jr.", "Barack Obama", source="webquestions")["correct"]
    assert not M.score_example("  ", "Barack Obama", source="webquestions")["correct"]  # empty is not contained
    # other sources: exact match only
    assert not M.score_example("Obama", "Barack Obama", source="triviaqa")["correct"]


def test_alias_aware_exact_match_is_reported_beside_the_strict_one():
    rows = [M.score_example("NYC", "New York City", aliases=["nyc", "New York"], source="triviaqa"),
            M.score_example("Paris", "Paris", aliases=["City of Light"], source="triviaqa")]
    agg = M.aggregate(rows, ["triviaqa"] * 2)
    assert agg["accuracy"] == agg["exact_match"] == 0.5
    assert agg["alias_exact_match"] == 1.0
    no_alias = M.aggregate([M.score_example("x", "x", source="kvr")], ["kvr"])
    assert no_alias["alias_exact_match"] is None


def test_rouge_l():
    assert M.rouge_l("the cat sat", "the cat sat") == pytest.approx(1.0)
    assert M.rouge_l("dog", "the cat sat") == 0.0
    # LCS "the cat" = 2 of 3 tokens each side
    assert M.rouge_l("the cat ran", "the cat sat") == pytest.approx(2 / 3)


def test_gsm8k_final_number_after_hashes():
    gold = "She has 3 + 4 = 7 apples, so 7 * 2 = 14.\n#### 14"
    assert M.task_of("gsm8k") == M.GSM8K and M.task_of("openai/gsm8k") == M.GSM8K
    assert M.gsm8k_answer(gold) == "14"
    assert M.gsm8k_match("Doubling gives 14.\n#### 14", gold)
    assert M.gsm8k_match("#### 14.00", gold)
    assert M.gsm8k_match("#### $1,400", "#### 1400")
    assert not M.gsm8k_match("the answer is 14", gold)  # strict: the number must follow ####
    assert not M.gsm8k_match("#### 15", gold)
    assert M.gsm8k_match("so 14", "14")  # gold stored as a bare number: the last number counts
    assert M.gsm8k_answer("#### -3.50") == "-3.5"


def test_math_last_boxed_normalised():
    assert M.task_of("hendrycks_math") == M.MATH and M.task_of("MATH-500") == M.MATH
    assert M.task_of("mathqa") == M.EXACT and M.task_of("math_qa") == M.EXACT
    assert M.last_boxed("a \\boxed{1} then \\boxed{\\frac{1}{2}} done") == "\\frac{1}{2}"
    assert M.last_boxed("\\boxed{x^{2}+1}") == "x^{2}+1"
    assert M.last_boxed("no box") is None
    gold = "So the answer is $\\boxed{\\frac{1}{2}}$."
    for pred in ("\\boxed{\\dfrac{1}{2}}", "\\boxed{1/2}", "\\boxed{0.5}", "\\boxed{\\frac12}",
                 "\\boxed{ \\frac{1}{2} }"):
        assert M.math_match(pred, gold), pred
    assert not M.math_match("\\boxed{\\frac{1}{3}}", gold)
    assert not M.math_match("1/2", gold)  # nothing boxed
    assert M.normalize_math("10^\\circ") == "10" and M.normalize_math("\\left(3\\right)") == "(3)"
    assert M.normalize_math("x = 5") == "5" and M.normalize_math("5\\text{ cm}") == "5"


def test_score_predictions_uses_the_source_rule():
    from remix_ds.evaluate import score_predictions
    exs = [Example("q1", "#### 4", source="gsm8k"), Example("q2", "#### 5", source="gsm8k")]
    s = score_predictions(exs, ["2+2=4 #### 4", "#### 6"])
    assert s["accuracy"] == 0.5 and s["accuracy_metric"] == M.GSM8K and s["exact_match"] == 0.0
    assert s["rows"][0]["pred_answer"] == "4"


def test_unknown_scorer_is_refused():
    from remix_ds.errors import ConfigError
    from remix_ds.evaluate import check_scorer
    with pytest.raises(ConfigError, match="teacher-forced"):
        check_scorer("teacher_forcing")


def test_predictions_are_decoded_without_space_clean_up(tiny_dir):
    """Llama-3's tokenizers "clean up" " ." to "." on decode by default; predictions keep the text as generated,
    so a gold answer holding " 's" or " ," can match (the tiny tokenizer switched to clean-up here, as the
    transformers versions setup.py allows do for Llama-3)."""
    from remix_ds.evaluate import decode
    from remix_ds.model import load_tokenizer

    tok = load_tokenizer(tiny_dir)
    tok.clean_up_tokenization_spaces = True
    # transformers >= 5.2x ignores the clean-up for BPE tokenizers unless told this too (older ones apply it)
    tok.clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output = True
    text = "ocean 's eleven , part 2 ."
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids, skip_special_tokens=True) != text        # what the default would have scored
    assert decode(tok, ids + [tok.eos_token_id]) == text


def test_generation_budget_covers_the_longest_alias(tiny_dir):
    from remix_ds.evaluate import default_max_new_tokens
    from remix_ds.model import load_tokenizer

    tok = load_tokenizer(tiny_dir)
    long_alias = "the value of key number seventeen"
    ex = Example(prompt="q", answer="x", aliases=[long_alias], source="popqa")
    assert default_max_new_tokens(tok, [ex]) == len(tok.encode(long_alias, add_special_tokens=False)) + 4


# ------------------------------------------------------------------ on a trained tiny model

@pytest.fixture(scope="module")
def trained(tiny_dir):
    """The tiny model trained briefly (fp32, plain torch) on 30 KVR pairs: some learnt, some not."""
    from transformers import AutoModelForCausalLM

    from remix_ds.data.formatting import collate, pad_id_of
    from remix_ds.data.kvr import kvr_examples
    from remix_ds.evaluate import encode_for_scoring
    from remix_ds.model import load_tokenizer

    from remix_ds.evaluate import model_logits_fn, teacher_forced_scores

    torch.manual_seed(0)
    tok = load_tokenizer(tiny_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    train = kvr_examples(30, 7, "A")
    enc = encode_for_scoring(tok, train)
    batch = collate(enc, pad_id_of(tok))
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    # full-batch steps until between a quarter and three quarters of the pairs are learnt (whatever the base)
    for step in range(1, 201):
        model.train()
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step >= 20 and step % 5 == 0:
            model.eval()
            res = teacher_forced_scores(model_logits_fn(model, torch.device("cpu")), enc, 32, pad_id_of(tok))
            if 8 <= sum(ok for _, ok, _ in res) <= 22:
                break
    model.eval()
    # the trained pairs plus 10 never seen (certainly wrong)
    return model, tok, train + kvr_examples(10, 7, "B")


def test_teacher_forced_exact_match_equals_greedy_exact_token_match(trained):
    from remix_ds.data.formatting import answer_ids, pad_id_of
    from remix_ds.evaluate import encode_for_scoring, generate_token_ids, model_logits_fn, teacher_forced_scores

    from remix_ds.evaluate import model_predict_fn

    model, tok, examples = trained
    cpu = torch.device("cpu")
    tf = teacher_forced_scores(model_logits_fn(model, cpu), encode_for_scoring(tok, examples), 8, pad_id_of(tok))
    assert [i for i, _, _ in tf] == list(range(len(examples)))
    # the LM head on answer positions only: the same verdicts and prefixes as from the full logits
    assert teacher_forced_scores(model_predict_fn(model, cpu), encode_for_scoring(tok, examples), 8,
                                 pad_id_of(tok)) == tf
    # correctness only (results gathered once at the end), with a last batch of another size: same verdicts
    quick = teacher_forced_scores(model_predict_fn(model, cpu), encode_for_scoring(tok, examples), 7,
                                  pad_id_of(tok), prefixes=False)
    assert len(examples) % 7 and [(i, ok) for i, ok, _ in quick] == [(i, ok) for i, ok, _ in tf]
    gen = generate_token_ids(model, tok, [e.prompt for e in examples], 7, 16, cpu)
    n_right = n_wrong_late = 0
    for (i, ok, prefix), g, ex in zip(tf, gen, examples):
        gold = answer_ids(tok, ex.answer)  # answer tokens + EOS
        assert ok == (g == gold), (ex.answer, tok.decode(g))
        # the teacher-forced prefix is what greedy decoding produced up to its first wrong token
        assert g[:len(prefix)] == prefix
        n_right += ok
        n_wrong_late += (not ok) and len(prefix) >= 1
    # the check is not vacuous: some right, some wrong, and some wrong after a correct first token
    assert 3 <= n_right <= len(examples) - 10, n_right
    assert n_wrong_late >= 1


def test_scorers_write_predictions_and_agree_on_kvr(trained, tmp_path):
    from remix_ds.evaluate import evaluate

    model, tok, examples = trained
    cpu = torch.device("cpu")
    g = evaluate(model, tok, examples, scorer="generate", batch_size=16, device=cpu, out_dir=str(tmp_path), name="gen")
    t = evaluate(model, tok, examples, scorer="teacher-forced", batch_size=16, device=cpu, out_dir=str(tmp_path),
                 name="tf")
    assert g["scorer"] == "generate" and t["scorer"] == "teacher-forced"
    assert g["n"] == t["n"] == len(examples)
    # KVR answers are lower-case alphanumerics: string EM and token match coincide here
    assert g["accuracy"] == g["exact_match"] == t["accuracy"] > 0
    assert 0 < g["rouge_l"] <= 1 and g["alias_exact_match"] is None
    rows_g = [json.loads(x) for x in (tmp_path / "gen.predictions.jsonl").read_text().splitlines()]
    rows_t = [json.loads(x) for x in (tmp_path / "tf.predictions.jsonl").read_text().splitlines()]
    assert len(rows_g) == len(rows_t) == len(examples)
    for rg, rt, ex in zip(rows_g, rows_t, examples):
        assert {"prompt", "gold", "prediction", "correct"} <= set(rg) and rg["gold"] == ex.answer
        assert rg["correct"] == rt["correct"]
        if rt["correct"]:
            assert rt["prediction"] == rg["prediction"] == ex.answer
        else:  # the teacher-forced prediction is the start of the generated one
            assert rg["prediction"].startswith(rt["prediction"])
    assert json.loads((tmp_path / "gen.json").read_text())["accuracy"] == g["accuracy"]


def test_ranks_split_examples_and_run_the_same_number_of_passes(trained, monkeypatch):
    """Rank r scores examples r, r+W, ...; every rank runs the same number of forward passes."""
    from remix_ds import dist
    from remix_ds.data.formatting import pad_id_of
    from remix_ds.evaluate import encode_for_scoring, model_logits_fn, teacher_forced_scores

    model, tok, examples = trained
    enc = encode_for_scoring(tok, examples[:9])
    base = model_logits_fn(model, torch.device("cpu"))
    full = {i: ok for i, ok, _ in teacher_forced_scores(base, enc, 2, pad_id_of(tok))}
    seen = {}
    for r in (0, 1):
        calls = []

        def fn(batch):
            calls.append(batch["input_ids"].shape[0])
            return base(batch)
        monkeypatch.setattr(dist, "rank", lambda: r)
        monkeypatch.setattr(dist, "world_size", lambda: 2)
        res = teacher_forced_scores(fn, enc, 2, pad_id_of(tok))
        assert [i for i, _, _ in res] == list(range(r, 9, 2))
        assert len(calls) == 3  # ceil(9 / (2 ranks x 2)): rank 1 has 4 examples and runs one dummy batch
        seen.update({i: ok for i, ok, _ in res})
    assert seen == full
