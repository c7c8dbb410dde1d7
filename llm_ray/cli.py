"""``llm-ray`` command line. Each stage command prints its output folder on its last line."""

from __future__ import annotations

import argparse
import json
import sys


def _recipe(args):
    from llm_ray.config import load_recipe

    return load_recipe(args.recipe, args.set)


def _print_result(result) -> None:
    """A stage's summary (stdout), then its output folder as the last line."""
    print(json.dumps(result.summary, indent=2))
    print(result.out_dir)


def cmd_pretrain(args) -> None:
    from llm_ray.train.launcher import pretrain

    _print_result(pretrain(_recipe(args)))  # the recipe is validated before any Ray work starts


def cmd_data_prepare(args) -> None:
    from llm_ray.data.pipeline import prepare, print_summary

    recipe = _recipe(args)
    recipe.prepare.require_io()  # before any Ray work
    result = prepare(recipe)
    print_summary(result.summary)
    print(result.out_dir)


def cmd_recipe(args) -> None:
    from llm_ray.train.ds_config import deepspeed_config

    recipe = _recipe(args)
    print(recipe.to_yaml())
    if args.deepspeed:
        print(json.dumps(deepspeed_config(recipe, on_gpu=args.gpu), indent=2))


def cmd_tokenizer_train(args) -> None:
    from llm_ray.config import RecipeError
    from llm_ray.data.text_files import list_text_files
    from llm_ray.data.tokenizer import save_tokenizer, tokenizer_hash, train_tokenizer

    try:
        files = list_text_files(args.files)
    except RecipeError as e:  # the files come from the command line here, not from a recipe key
        print(f"llm-ray tokenizer train: {e.message}", file=sys.stderr)
        raise SystemExit(2) from None
    tok = train_tokenizer(files, args.kind, args.vocab_size, args.min_frequency)
    save_tokenizer(tok, args.out)
    print(f"vocab {tok.get_vocab_size()}  hash {tokenizer_hash(tok)}", file=sys.stderr)
    print(args.out)


def cmd_export(args) -> None:
    from llm_ray.train.export import export_model

    _print_result(export_model(args.run, args.out, s3_endpoint=args.s3_endpoint, encrypt=args.encrypt))


def cmd_import(args) -> None:
    from llm_ray.bundle import import_hf
    from llm_ray.interop import InteropError

    try:
        out = import_hf(args.source, args.out, tokenizer=args.tokenizer)
    except InteropError as e:
        raise SystemExit(f"llm-ray import: {e}") from None
    with open(f"{out}/summary.json") as f:
        print(f.read())
    print(out)


def cmd_export_hf(args) -> None:
    from llm_ray.bundle import export_hf
    from llm_ray.interop import InteropError

    try:
        summary = export_hf(args.model, args.out, verify=not args.no_verify)
    except InteropError as e:
        raise SystemExit(f"llm-ray export-hf: {e}") from None
    print(json.dumps(summary, indent=2))
    print(summary["out_dir"])


def cmd_generate(args) -> None:
    from llm_ray.generation.command import run

    run(args)


def cmd_bench_generate(args) -> None:
    from llm_ray.bench.generate import bench_generate

    bench_generate(args.model, new_tokens=args.new_tokens, batch=args.batch, repeats=args.repeats, dtype=args.dtype)


def cmd_eval(args) -> None:
    from llm_ray.config.eval import load_eval_spec
    from llm_ray.eval.run import eval_stage

    spec = load_eval_spec(args.spec, args.set)  # validated before the model loads
    _print_result(eval_stage(spec, args.out))


def cmd_redteam(args) -> None:
    from llm_ray.config.redteam import load_redteam_spec
    from llm_ray.privacy.redteam import RedteamError, redteam_stage

    spec = load_redteam_spec(args.spec, args.set)  # validated before the model loads or a request goes out
    try:
        _print_result(redteam_stage(spec, args.out))
    except RedteamError as e:  # unreachable endpoint, refused key: one line
        raise SystemExit(f"llm-ray redteam: {e}") from None


def cmd_compress(args) -> None:
    from llm_ray.config import RecipeError

    if args.spec == "sweep":  # llm-ray compress sweep SPEC
        from llm_ray.compress.sweep import sweep_stage
        from llm_ray.config.compress import load_sweep_spec

        if not args.sweep_spec:
            raise RecipeError("", "llm-ray compress sweep needs a sweep spec (jobs/recipes/compress-sweep-*.yaml)")
        _print_result(sweep_stage(*load_sweep_spec(args.sweep_spec, args.set)))  # every trial validated first
        return
    from llm_ray.compress.stage import compress_stage
    from llm_ray.config.compress import load_compress_spec

    if not args.out:
        raise RecipeError("", "llm-ray compress SPEC needs --out DIR")
    spec = load_compress_spec(args.spec, args.set)  # validated before the model loads
    _print_result(compress_stage(spec, args.out))


def cmd_canary(args) -> None:
    from llm_ray.config.canary import load_canary_spec
    from llm_ray.privacy.canary import canary_stage

    spec = load_canary_spec(args.spec, args.set)  # validated before any Ray work (the arms' recipes too, in the stage)
    _print_result(canary_stage(spec, args.out))


def cmd_demo(args) -> None:
    from llm_ray.demo import run_demo

    print(run_demo(args.out))


def cmd_bench_train(args) -> None:
    from llm_ray.bench.train import bench_train

    bench_train(args.recipe, args.set, steps=args.steps)


def cmd_sft(args) -> None:
    from llm_ray.finetune.sft import sft

    _print_result(sft(_recipe(args)))  # sft validates the recipe before any Ray work


def cmd_reward(args) -> None:
    from llm_ray.align.reward import reward

    _print_result(reward(_recipe(args)))


def cmd_dpo(args) -> None:
    from llm_ray.align.dpo import dpo

    _print_result(dpo(_recipe(args)))


def cmd_ppo(args) -> None:
    from llm_ray.align.ppo import ppo

    _print_result(ppo(_recipe(args)))


def cmd_federated(args) -> None:
    from llm_ray.privacy.federated import federated

    _print_result(federated(_recipe(args)))  # the recipe is checked before any Ray work starts


def cmd_bench_ppo(args) -> None:
    from llm_ray.bench.ppo import bench_ppo

    bench_ppo(args.recipe, args.set, iterations=args.iterations)


def cmd_bench_compress(args) -> None:
    from llm_ray.bench.compress import bench_compress

    bench_compress(args.text, args.model, args.methods.split(",") if args.methods else None, args.set)


def cmd_bench_dpo(args) -> None:
    from llm_ray.bench.dpo import bench_dpo

    bench_dpo(args.recipe, args.set, steps=args.steps)


def cmd_bench_privacy(args) -> None:
    from llm_ray.bench.privacy import bench_privacy

    bench_privacy(args.recipe, args.set, steps=args.steps, parts=tuple(args.parts.split(",")),
                  federated_recipe=args.federated, rounds=args.rounds)


def cmd_bench_data(args) -> None:
    from llm_ray.bench.data import bench_data

    bench_data(copies=args.copies, steps=args.steps)


def cmd_serve(args) -> None:
    from llm_ray.config.serve import load_serve_config

    cfg = load_serve_config(args.recipe, args.set)  # validated before Ray starts
    from llm_ray.serve.cli import serve_forever

    serve_forever(cfg)


def cmd_bench_serve(args) -> None:
    from llm_ray.bench.serve import bench_serve

    bench_serve(args.recipe, args.set, clients=args.clients, max_tokens=args.max_tokens, rounds=args.rounds, workloads=args.workloads,
                original=args.original)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llm-ray", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def with_recipe(p, required=True):
        p.add_argument("recipe", nargs=None if required else "?", help="YAML recipe (jobs/recipes/*.yaml)")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. parallel.zero_stage=3")

    def with_spec(p, kind: str, example: str, out: str):  # SPEC --out DIR stages (eval, redteam, canary)
        p.add_argument("spec", help=f"YAML {kind} spec (jobs/recipes/{kind.replace('-', '')}-*.yaml)")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=f"override, e.g. {example}")
        p.add_argument("--out", required=True, help=out)

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

    p = sub.add_parser("export", help="consolidate a run's latest checkpoint into safetensors + config + tokenizer (--encrypt: sealed)")
    p.add_argument("run", help="run folder (storage_path/name) or one of its checkpoint_* folders; local or s3://")
    p.add_argument("--out", required=True)
    p.add_argument("--s3-endpoint", default=None)
    p.add_argument("--encrypt", action="store_true", help="store weights and tokenizer AES-256-GCM encrypted (key: LLM_RAY_ENCRYPTION_KEY or _FILE)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("import", help="Hugging Face folder (Llama, GPT-2, BERT), .gguf file or packaged name -> model folder")
    p.add_argument("source", help="HF model folder, .gguf file, or smollm2 / minilm")
    p.add_argument("--out", required=True)
    p.add_argument("--tokenizer", default=None, help="folder with the tokenizer when the source has none")
    p.set_defaults(func=cmd_import)

    p = sub.add_parser("export-hf", help="decoder model folder -> Hugging Face folder (Llama or GPT-2 layout)")
    p.add_argument("model", help="model folder (llm-ray export / import) or packaged name")
    p.add_argument("--out", required=True)
    p.add_argument("--no-verify", action="store_true", help="skip loading it back with transformers to compare logits")
    p.set_defaults(func=cmd_export_hf)

    p = sub.add_parser("generate", help="greedy, sampling or beam-search continuation (or chat reply) from a model folder")
    from llm_ray.generation.command import add_arguments as add_generate_arguments

    add_generate_arguments(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("eval", help="perplexity, generation and classification metrics of a model folder")
    with_spec(p, "eval", "tasks.heldout.window=128", "folder for report.json, report.md, summary.json")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("redteam", help="jailbreak, prompt-injection, PII-extraction and toxicity prompts against a model folder or an OpenAI-compatible endpoint, scored by rules")
    with_spec(p, "red-team", "target.model=models/tiny, limit_per_category=2",
              "folder for report.json, report.md, responses.jsonl, summary.json")
    p.set_defaults(func=cmd_redteam)

    p = sub.add_parser("compress", help="quantize, prune or distill a model folder (SPEC --out DIR), or sweep methods with Ray Tune (sweep SPEC)")
    p.add_argument("spec", help="YAML compress spec (jobs/recipes/compress-*.yaml), or 'sweep'")
    p.add_argument("sweep_spec", nargs="?", help="after 'sweep': the sweep spec (a compress spec with a sweep section)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. method=int4, sweep.name=s2")
    p.add_argument("--out", help="SPEC: folder for the compressed model folder and summary.json")
    p.set_defaults(func=cmd_compress)

    p = sub.add_parser("canary", help="canary exposure: secrets planted into a corpus, trained plain / DP-SGD / PII-scrubbed, exposure per arm")
    with_spec(p, "canary", "arms=[plain,dp], canaries.repeats=[1,8]",
              "folder for the planted corpus, the runs and models, summary.json, report.md")
    p.set_defaults(func=cmd_canary)

    p = sub.add_parser("demo", help="tokenizer -> pretrain -> resume -> export -> sample, on local Ray and CPU")
    p.add_argument("--out", default="runs/demo")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("sft", help="supervised fine-tuning (chat or classification; freezing, LoRA) of a model folder")
    with_recipe(p)
    p.set_defaults(func=cmd_sft)

    p = sub.add_parser("reward", help="reward model (Bradley-Terry) on preference pairs, from a model folder")
    with_recipe(p)
    p.set_defaults(func=cmd_reward)

    p = sub.add_parser("dpo", help="direct preference optimisation (DPO / IPO / conservative DPO) of a decoder folder")
    with_recipe(p)
    p.set_defaults(func=cmd_dpo)

    p = sub.add_parser("ppo", help="RL from a reward (GRPO; PPO) on separate Ray actor pools: rollout, reward, reference, policy update")
    with_recipe(p)
    p.set_defaults(func=cmd_ppo)

    p = sub.add_parser("federated", help="federated training: client actors with private shards, FedAvg/FedProx, secure aggregation, client DP")
    with_recipe(p)
    p.set_defaults(func=cmd_federated)

    p = sub.add_parser("bench", help="benchmarks (not tests): same-run ratios against a named baseline")
    bsub = p.add_subparsers(dest="bench_command", required=True)
    b = bsub.add_parser("train", help="engine (Ray Train + DeepSpeed, 1 worker) vs a bare PyTorch loop")
    with_recipe(b, required=False)
    b.add_argument("--steps", type=int, default=12)
    b.set_defaults(func=cmd_bench_train)
    b = bsub.add_parser("dpo", help="DPO step vs SFT step on the same model and tokens (frozen copy, precomputed reference)")
    b.add_argument("recipe", nargs="?", default="jobs/recipes/dpo-tiny.yaml", help="dpo recipe")
    b.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. finetune.init_from=smollm2")
    b.add_argument("--steps", type=int, default=10)
    b.set_defaults(func=cmd_bench_dpo)
    b = bsub.add_parser("privacy", help="DP-SGD step vs the same non-private step; secure-aggregation round vs plain FedAvg (same run)")
    b.add_argument("recipe", nargs="?", default="jobs/recipes/dp-tiny.yaml", help="a recipe with privacy.dp")
    b.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. parallel.num_workers=1")
    b.add_argument("--steps", type=int, default=12)
    b.add_argument("--parts", default="dp,secagg", help="dp (DP-SGD step) and/or secagg (secure aggregation round)")
    b.add_argument("--federated", default="jobs/recipes/federated-tiny.yaml", help="federated recipe for the secagg part")
    b.add_argument("--rounds", type=int, default=4, help="rounds of each federated run (the first is left out)")
    b.set_defaults(func=cmd_bench_privacy)
    b = bsub.add_parser("ppo", help="one RL run: samples/s, each phase's share, rollout pool vs the engine alone")
    b.add_argument("recipe", nargs="?", default="jobs/recipes/grpo-tiny.yaml", help="ppo recipe")
    b.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. align.ppo.estimator=ppo")
    b.add_argument("--iterations", type=int, default=6, help="iterations of the run (the first is left out)")
    b.set_defaults(func=cmd_bench_ppo)
    from llm_ray.bench.compress import DEFAULT_METHODS as DEFAULT_COMPRESS_METHODS  # a list: no torch

    b = bsub.add_parser("compress", help="every compression method on one model and held-out text: bytes, perplexity, tokens/s vs the original")
    b.add_argument("text", help="held-out text file (perplexity)")
    b.add_argument("--model", default="smollm2", help="model folder or packaged name")
    b.add_argument("--methods", default="", help="comma-separated; default " + ",".join(DEFAULT_COMPRESS_METHODS))
    b.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="compress spec override, e.g. sparsity=0.25")
    b.set_defaults(func=cmd_bench_compress)
    b = bsub.add_parser("data", help="prepare throughput vs plain read + tokenize; data-wait share of step time")
    b.add_argument("--copies", type=int, default=8, help="copies of the bundled corpus (words shuffled) as input")
    b.add_argument("--steps", type=int, default=30)
    b.set_defaults(func=cmd_bench_data)
    b = bsub.add_parser("generate", help="our generation (KV cache on/off) vs transformers generate, batch 1 and 16")
    b.add_argument("model", nargs="?", default="smollm2", help="model folder or packaged name (transformers loads the same weights)")
    b.add_argument("--new-tokens", type=int, default=64)
    b.add_argument("--batch", type=int, default=16, help="the large batch (the small one is 1)")
    b.add_argument("--repeats", type=int, default=3, help="timed runs per configuration; the best counts")
    b.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    b.set_defaults(func=cmd_bench_generate)
    b = bsub.add_parser("serve", help="OpenAI endpoint at 1/8/32 concurrent clients vs transformers generate (sequential, static batch)")
    b.add_argument("recipe", nargs="?", default="jobs/recipes/serve-smollm2.yaml", help="serve recipe")
    b.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. serve.max_batch_size=16")
    b.add_argument("--clients", default="1,8,32", help="comma-separated concurrency levels")
    b.add_argument("--max-tokens", type=int, default=64, help="tokens generated per request, the mean for 'mixed' (eos ignored)")
    b.add_argument("--rounds", type=int, default=4, help="requests per client: N clients share a queue of N*rounds requests")
    b.add_argument("--workloads", default="uniform,mixed", help="uniform (all max-tokens long), and any of mixed (lengths drawn around max-tokens), shared_prefix (one long shared prefix + short question; engine with prefix cache on vs off)")
    b.add_argument("--original", default="", help="the model a compressed serve.model came from: its in-process engine on the same requests, for same-run ratios")
    b.set_defaults(func=cmd_bench_serve)

    p = sub.add_parser("serve", help="OpenAI-compatible endpoint on Ray Serve (continuous batching); blocks")
    with_recipe(p, required=False)
    p.set_defaults(func=cmd_serve)
    return parser


def main(argv: list[str] | None = None) -> None:
    from llm_ray.config import RecipeError
    from llm_ray.storage import StorageError

    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except RecipeError as e:
        print(f"llm-ray: invalid recipe: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except StorageError as e:  # unreachable storage, refused credentials: one line naming bucket and key
        print(f"llm-ray: storage: {e}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
