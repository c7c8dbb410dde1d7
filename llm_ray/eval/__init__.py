"""Evaluation (``llm-ray eval``): perplexity, generation and classification tasks.

    metrics.py     BLEU (sacrebleu), ROUGE-1/2/L (rouge-score), METEOR (nltk), accuracy, macro F1
    bertscore.py   BERTScore with our encoder (MiniLM by default)
    perplexity.py  sliding-window perplexity, windows batched
    prompts.py     zero-shot, few-shot and chain-of-thought prompts
    tasks.py       task runners over a loaded model folder
    report.py      report.json, report.md, summary.json
    run.py         run_eval(spec, out_dir)

The spec is ``llm_ray.config.eval.EvalSpec``. Importing this package imports nothing heavy.
"""
