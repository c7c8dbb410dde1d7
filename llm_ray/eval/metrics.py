"""Text and classification metrics: BLEU (sacrebleu), ROUGE-1/2/L (rouge-score), METEOR (nltk),
accuracy and macro F1.

Every generation metric takes ``predictions: list[str]`` and ``references: list[list[str]]``
(one or more references per prediction) and returns plain floats on the libraries' own scales:
BLEU 0-100 (sacrebleu), ROUGE and METEOR 0-1.
"""

from __future__ import annotations

from typing import Sequence


def _check_lengths(predictions: Sequence, references: Sequence) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} reference lists")
    if not predictions:
        raise ValueError("no predictions to score")
    for i, refs in enumerate(references):
        if isinstance(refs, str) or not refs:
            raise ValueError(f"references[{i}] must be a non-empty list of strings")


def bleu(predictions: list[str], references: list[list[str]]) -> dict:
    """Corpus BLEU with sacrebleu's defaults (13a tokenizer, exp smoothing), 0-100."""
    import sacrebleu

    _check_lengths(predictions, references)
    n_refs = max(len(r) for r in references)
    # sacrebleu wants one stream per reference position; a missing reference is None.
    streams = [[refs[j] if j < len(refs) else None for refs in references] for j in range(n_refs)]
    result = sacrebleu.corpus_bleu(predictions, streams)
    return {"bleu": float(result.score), "bleu_brevity_penalty": float(result.bp)}


def rouge(predictions: list[str], references: list[list[str]], use_stemmer: bool = True) -> dict:
    """Mean ROUGE-1/2/L F-measure over examples; with several references the best one counts
    (rouge-score's ``score_multi``)."""
    from rouge_score import rouge_scorer

    _check_lengths(predictions, references)
    types = ("rouge1", "rouge2", "rougeL")
    scorer = rouge_scorer.RougeScorer(list(types), use_stemmer=use_stemmer)
    totals = dict.fromkeys(types, 0.0)
    for pred, refs in zip(predictions, references):
        scores = scorer.score_multi(refs, pred)
        for t in types:
            totals[t] += scores[t].fmeasure
    return {t: totals[t] / len(predictions) for t in types}


class NoSynonymWordNet:
    """Stand-in for ``nltk.corpus.wordnet`` with no synonyms.

    The WordNet data cannot be downloaded on our machines (no internet), and nltk's METEOR
    looks up synonyms for every unmatched word. With this object METEOR matches exact words and
    Porter stems only (the first two of its three matching stages); the real WordNet is used
    whenever nltk finds its data.
    """

    def synsets(self, word, *args, **kwargs):
        return []


def meteor_wordnet():
    """nltk's WordNet reader when its data is installed, else ``NoSynonymWordNet()``."""
    from nltk.corpus import wordnet

    try:
        wordnet.ensure_loaded()
        return wordnet
    except LookupError:
        return NoSynonymWordNet()


def meteor(predictions: list[str], references: list[list[str]], wordnet=None) -> dict:
    """Mean sentence METEOR (nltk ``meteor_score``, default alpha/beta/gamma) over examples.

    Text is split on whitespace after lower-casing (nltk wants pre-tokenized input; its own
    ``word_tokenize`` needs the punkt data, which is not installed either).
    """
    from nltk.translate.meteor_score import meteor_score

    _check_lengths(predictions, references)
    wn = wordnet if wordnet is not None else meteor_wordnet()
    total = 0.0
    for pred, refs in zip(predictions, references):
        total += meteor_score([r.split() for r in refs], pred.split(), wordnet=wn)
    return {"meteor": total / len(predictions)}


def accuracy(y_true: Sequence, y_pred: Sequence) -> float:
    if len(y_true) != len(y_pred) or not y_true:
        raise ValueError(f"accuracy needs equal, non-empty label lists ({len(y_true)} vs {len(y_pred)})")
    return sum(t == p for t, p in zip(y_true, y_pred)) / len(y_true)


def f1_per_class(y_true: Sequence, y_pred: Sequence) -> dict:
    """F1 of every label seen in either list (0 where precision + recall is 0)."""
    labels = sorted(set(y_true) | set(y_pred), key=str)
    out = {}
    for label in labels:
        tp = sum(t == label and p == label for t, p in zip(y_true, y_pred))
        fp = sum(t != label and p == label for t, p in zip(y_true, y_pred))
        fn = sum(t == label and p != label for t, p in zip(y_true, y_pred))
        out[label] = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0
    return out


def macro_f1(y_true: Sequence, y_pred: Sequence) -> float:
    """Unweighted mean of per-class F1 over the labels in either list (scikit-learn's
    ``f1_score(average="macro", zero_division=0)``); written out to keep scikit-learn out of the
    runtime dependencies."""
    if len(y_true) != len(y_pred) or not y_true:
        raise ValueError(f"f1 needs equal, non-empty label lists ({len(y_true)} vs {len(y_pred)})")
    per_class = f1_per_class(y_true, y_pred)
    return sum(per_class.values()) / len(per_class)


def classification_metrics(y_true: Sequence, y_pred: Sequence) -> dict:
    return {"accuracy": accuracy(y_true, y_pred), "f1_macro": macro_f1(y_true, y_pred)}
