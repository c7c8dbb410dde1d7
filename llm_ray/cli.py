"""``llm-ray`` command line. Each stage command prints its output folder on its last line."""

from __future__ import annotations

import argparse
import json
import sys


def _recipe(args):
    from llm_ray.config import load_recipe

    return load_recipe(args.recipe, args.set)


def cmd_pretrain(args) -> None:
    from llm_ray.train.launcher import pretrain

    recipe = _recipe(args)  # validated before any Ray work starts
    result = pretrain(recipe)
    print(json.dumps(result.summary, indent=2))
    print(result.run_dir)


def cmd_data_prepare(args) -> None:
    from llm_ray.data.pipeline import prepare, print_summary

    recipe = _recipe(args)
    recipe.prepare.require_io()  # before any Ray work
    summary = prepare(recipe)
    print_summary(summary)
    print(summary["output"])


def cmd_recipe(args) -> None:
    from llm_ray.train.ds_config import deepspeed_config

    recipe = _recipe(args)
    print(recipe.to_yaml())
    if args.deepspeed:
        print(json.dumps(deepspeed_config(recipe, on_gpu=args.gpu), indent=2))


def cmd_tokenizer_train(args) -> None:
    from llm_ray.data.text_files import list_text_files
    from llm_ray.data.tokenizer import save_tokenizer, tokenizer_hash, train_tokenizer

    tok = train_tokenizer(list_text_files(args.files), args.kind, args.vocab_size, args.min_frequency)
    save_tokenizer(tok, args.out)
    print(f"vocab {tok.get_vocab_size()}  hash {tokenizer_hash(tok)}", file=sys.stderr)
    print(args.out)


def cmd_export(args) -> None:
    from llm_ray.train.export import export_model

    summary = export_model(args.run, args.out, s3_endpoint=args.s3_endpoint)
    print(json.dumps(summary, indent=2))
    print(summary["out_dir"])


def cmd_generate(args) -> None:
    from llm_ray.train.export import load_exported
    from llm_ray.models.generate import greedy_generate

    import torch

    model, tokenizer, _ = load_exported(args.model)
    ids = torch.tensor([tokenizer.encode(args.prompt).ids])
    out = greedy_generate(model, ids, args.max_new_tokens)
    print(tokenizer.decode(out[0].tolist()))


def cmd_demo(args) -> None:
    from llm_ray.demo import run_demo

    print(run_demo(args.out))


def cmd_bench_train(args) -> None:
    from llm_ray.bench.train import bench_train

    bench_train(args.recipe, args.set, steps=args.steps)


def cmd_bench_data(args) -> None:
    from llm_ray.bench.data import bench_data

    bench_data(copies=args.copies, steps=args.steps)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llm-ray", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def with_recipe(p, required=True):
        p.add_argument("recipe", nargs=None if required else "?", help="YAML recipe (jobs/recipes/*.yaml)")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. parallel.zero_stage=3")

    p = sub.add_parser("pretrain", help="pretrain with Ray Train + DeepSpeed")
    with_recipe(p)
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("data", help="corpus pipeline on Ray Data")
    dsub = p.add_subparsers(dest="data_command", required=True)
    d = dsub.add_parser("prepare", help="clean, dedup, scrub PII, tokenize and pack raw corpora into shards")
    with_recipe(d)
    d.set_defaults(func=cmd_data_prepare)

    p = sub.add_parser("recipe", help="print the resolved recipe (and the DeepSpeed JSON it generates)")
    with_recipe(p, required=False)
    p.add_argument("--deepspeed", action="store_true")
    p.add_argument("--gpu", action="store_true", help="generate the DeepSpeed JSON for GPUs")
    p.set_defaults(func=cmd_recipe)

    p = sub.add_parser("tokenizer", help="tokenizer tools")
    tsub = p.add_subparsers(dest="tokenizer_command", required=True)
    t = tsub.add_parser("train", help="train a BPE or WordPiece tokenizer on text files")
    t.add_argument("files", nargs="+")
    t.add_argument("--kind", choices=["bpe", "wordpiece"], default="bpe")
    t.add_argument("--vocab-size", type=int, default=4096)
    t.add_argument("--min-frequency", type=int, default=2)
    t.add_argument("--out", required=True, help="tokenizer.json to write")
    t.set_defaults(func=cmd_tokenizer_train)

    p = sub.add_parser("export", help="consolidate a run's latest checkpoint into safetensors + config + tokenizer")
    p.add_argument("run", help="run folder (storage_path/name) or one of its checkpoint_* folders; local or s3://")
    p.add_argument("--out", required=True)
    p.add_argument("--s3-endpoint", default=None)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("generate", help="greedy continuation from an exported model")
    p.add_argument("model", help="folder written by llm-ray export")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("demo", help="tokenizer -> pretrain -> resume -> export -> sample, on local Ray and CPU")
    p.add_argument("--out", default="runs/demo")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("bench", help="benchmarks (not tests): same-run ratios against a named baseline")
    bsub = p.add_subparsers(dest="bench_command", required=True)
    b = bsub.add_parser("train", help="engine (Ray Train + DeepSpeed, 1 worker) vs a bare PyTorch loop")
    with_recipe(b, required=False)
    b.add_argument("--steps", type=int, default=12)
    b.set_defaults(func=cmd_bench_train)
    b = bsub.add_parser("data", help="prepare throughput vs plain read + tokenize; data-wait share of step time")
    b.add_argument("--copies", type=int, default=8, help="copies of the bundled corpus (words shuffled) as input")
    b.add_argument("--steps", type=int, default=30)
    b.set_defaults(func=cmd_bench_data)
    return parser


def main(argv: list[str] | None = None) -> None:
    from llm_ray.config import RecipeError

    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except RecipeError as e:
        print(f"llm-ray: invalid recipe: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
