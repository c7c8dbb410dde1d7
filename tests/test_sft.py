"""Supervised fine-tuning: masks, LoRA merge, classification head, recipe checks, and three real
``llm-ray sft`` runs (Ray Train + DeepSpeed on CPU) from a tiny decoder folder made here."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from llm_ray.config import RecipeError, load_recipe
from llm_ray.data.packing import IGNORE_INDEX
from llm_ray.data.sft import ChatTemplate, build_examples, chat_messages, encode_chat, read_jsonl
from llm_ray.models import build_model
from llm_ray.bundle import load_bundle
from tests.conftest import REPO, tiny_cfg

RECIPE = str(REPO / "jobs/recipes/sft-tiny.yaml")
INSTRUCTIONS = str(REPO / "jobs/data/sft/instructions.jsonl")
SENTIMENT = str(REPO / "jobs/data/sft/sentiment.jsonl")


def sft_recipe(tmp_path, name, init_from, *overrides):
    return load_recipe(RECIPE, [
        f"finetune.init_from={init_from}",
        f"finetune.train_path={INSTRUCTIONS}",
        f"run.storage_path={tmp_path}",
        f"run.name={name}",
        "run.progress_bar=false",
        "data.seq_len=64",
        *overrides,
    ])


# ---- data: what carries loss ------------------------------------------------------------------


def test_only_assistant_tokens_carry_labels(chat_tokenizer):
    template = ChatTemplate()  # ChatML
    messages = chat_messages({"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is the opposite of wet?"},
        {"role": "assistant", "content": "Dry."},
        {"role": "user", "content": "And of loud?"},
        {"role": "assistant", "content": "Quiet."},
    ]})
    pad = chat_tokenizer.token_to_id("<|pad|>")
    inputs, labels = encode_chat(messages, template, chat_tokenizer, 96, pad)
    assert inputs.shape == labels.shape == (96,)
    labelled = labels != IGNORE_INDEX
    # labels are the next tokens; the labelled ones spell exactly the two answers with their end markers
    spans, current = [], []
    for i in range(96):
        if labelled[i]:
            current.append(int(labels[i]))
        elif current:
            spans.append(current)
            current = []
    texts = [chat_tokenizer.decode(s, skip_special_tokens=False) for s in spans]
    assert texts == ["Dry.<|im_end|>\n", "Quiet.<|im_end|>\n"], texts
    # every prompt token (system, user, markers, 'assistant\n') is unlabelled, and so is padding
    full = chat_tokenizer.encode(template.render(messages), add_special_tokens=False).ids
    assert labelled.sum() == sum(len(s) for s in spans) < len(full) - 1
    assert (inputs[len(full) - 1:] == pad).all() and not labelled[len(full) - 1:].any()
    # truncated so that no response token is left: rejected, not silently kept
    from llm_ray.data.sft import BadRecord

    with pytest.raises(BadRecord, match="response_truncated"):
        encode_chat(messages, template, chat_tokenizer, 8, pad)


def test_malformed_records_are_counted_not_fatal(chat_tokenizer, tmp_path):
    path = tmp_path / "mixed.jsonl"
    lines = [
        json.dumps({"prompt": "What is 1 plus 1?", "response": "1 plus 1 is 2."}),
        "{not json",
        json.dumps([1, 2]),
        json.dumps({"messages": [{"role": "wizard", "content": "hi"}]}),
        json.dumps({"messages": [{"role": "user", "content": "hi"}]}),  # nothing to learn
        json.dumps({"something": "else"}),
        "",
        json.dumps({"instruction": "Say hi.", "output": "Hi."}),
    ]
    path.write_text("\n".join(lines) + "\n")
    records, bad = read_jsonl(str(path))
    template = ChatTemplate()
    ex = build_examples(records, str(path), lambda r: encode_chat(chat_messages(r), template, chat_tokenizer, 32, 0))
    reasons = sorted(r["reason"] for r in bad + ex.rejects)
    assert len(ex) == 2
    assert reasons == ["bad_role", "invalid_json", "no_assistant_turn", "not_an_object", "unknown_format"]
    assert {r["line"] for r in bad + ex.rejects} == {2, 3, 4, 5, 6}


# ---- LoRA and the classification head, pure torch ----------------------------------------------


def test_lora_starts_as_base_and_merges_exactly():
    from llm_ray.models.lora import LoRALinear, apply_lora, merge_lora

    torch.manual_seed(0)
    model = build_model(tiny_cfg(300, tie_embeddings=False)).eval()
    x = torch.randint(0, 300, (2, 12))
    base_logits = model(x)
    base_q = model.layers[0].attn.q_proj.weight.detach().clone()
    wrapped = apply_lora(model, ["q_proj", "v_proj"], r=4, alpha=8)
    assert len(wrapped) == 4 and all(isinstance(model.get_submodule(n), LoRALinear) for n in wrapped)
    assert torch.equal(model(x), base_logits)  # B = 0: the wrapped model is the base model
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {f"{n}.{w}" for n in wrapped for w in ("lora_A", "lora_B")}
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.normal_(std=0.5)
    adapted = model(x)
    assert not torch.allclose(adapted, base_logits)
    assert torch.equal(model.layers[0].attn.q_proj.base.weight, base_q)
    merge_lora(model)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert (model(x) - adapted).abs().max() <= 1e-5
    with pytest.raises(ValueError, match="lora.targets"):
        apply_lora(build_model(tiny_cfg(300)), ["qproj"], r=4, alpha=8)


def test_decoder_classifier_pools_last_real_token():
    from llm_ray.models.heads import SequenceClassifier, real_token_mask

    torch.manual_seed(0)
    clf = SequenceClassifier(build_model(tiny_cfg(300)), num_labels=3, pad_id=0).eval()
    a, b = torch.randint(1, 300, (1, 7)), torch.randint(1, 300, (1, 10))
    batch = torch.zeros(2, 10, dtype=torch.long)
    batch[0, :7], batch[1] = a[0], b[0]
    assert real_token_mask(batch, 0).sum(1).tolist() == [7, 10]
    together = clf.classify(batch)
    assert together.shape == (2, 3) and clf(batch).shape == (2, 3)
    assert torch.allclose(together[0], clf.classify(a)[0], atol=1e-5)  # padding changes nothing
    assert torch.allclose(together[1], clf.classify(b)[0], atol=1e-5)


def test_macro_f1_matches_scikit_learn():
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    from llm_ray.finetune.sft import accuracy_macro_f1

    y_true = np.array([0, 1, 2, 2, 1, 0, 0, 2])
    y_pred = np.array([0, 2, 2, 2, 1, 1, 0, 0])
    acc, f1 = accuracy_macro_f1(y_true, y_pred)
    assert acc == pytest.approx(sklearn_metrics.accuracy_score(y_true, y_pred))
    assert f1 == pytest.approx(sklearn_metrics.f1_score(y_true, y_pred, average="macro"))


# ---- recipe checks --------------------------------------------------------------------------


def test_bad_finetune_recipes_name_the_key(tiny_model_dir, tmp_path):
    from llm_ray.finetune.sft import prepare_recipe

    cfg = load_bundle(tiny_model_dir).cfg
    cases = {
        "finetune.freeze_layers": ["finetune.freeze_layers=3"],  # the model has 2
        "finetune.lora": ["finetune.lora.r=4", "finetune.freeze_layers=1"],
        "finetune.init_from": ["finetune.init_from="],
        "parallel.pipeline_stages": ["parallel.num_workers=2", "parallel.pipeline_stages=2"],
    }
    for key, overrides in cases.items():
        with pytest.raises(RecipeError) as err:
            prepare_recipe(sft_recipe(tmp_path, "bad", tiny_model_dir, *overrides), cfg)
        assert err.value.key == key, (key, err.value)
    load_time = {
        "finetune.lora.rank": ["finetune.lora.rank=4"],
        "finetune.labels": ["finetune.task=classification", "finetune.labels=[only]"],
        "finetune.task": ["finetune.task=regression"],
        "finetune.lora.dropout": ["finetune.lora.dropout=1.5"],
    }
    for key, overrides in load_time.items():
        with pytest.raises(RecipeError) as err:
            sft_recipe(tmp_path, "bad", tiny_model_dir, *overrides)
        assert err.value.key == key, (key, err.value)


# ---- real runs ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def frozen_run(ray_cluster, tiny_model_dir, tmp_path_factory):
    from llm_ray.finetune.sft import sft

    tmp = tmp_path_factory.mktemp("sft-frozen")
    return sft(sft_recipe(tmp, "frozen", tiny_model_dir, "finetune.freeze_embeddings=true", "finetune.freeze_layers=1",
                          "optim.lr=3e-3", "train.max_steps=24"))


@pytest.mark.slow
def test_sft_lowers_response_loss_and_keeps_frozen_weights(frozen_run, tiny_model_dir):
    from safetensors.torch import load_file

    s = frozen_run.summary
    print(json.dumps(s))
    assert s["eval_loss_after"] < s["eval_loss_before"] - 0.5, s
    assert s["train_loss_last"] < s["train_loss_first"], s
    assert s["train_examples"] + s["eval_examples"] == 42 and s["rejected"] == 0
    before, after = load_file(f"{tiny_model_dir}/model.safetensors"), load_file(f"{frozen_run.out_dir}/model.safetensors")
    frozen = [k for k in before if k.startswith(("embedding.", "layers.0."))]
    trained = [k for k in before if k.startswith(("layers.1.", "head."))]
    assert frozen and trained
    for k in frozen:
        assert torch.equal(before[k], after[k]), k  # bit-identical
    assert all(not torch.equal(before[k], after[k]) for k in trained if k.endswith("weight"))
    assert s["frozen_unchanged"] is True
    assert s["frozen_params"] == sum(before[k].numel() for k in frozen)
    assert s["trainable_params"] == sum(before[k].numel() for k in trained if k != "head.proj.weight")  # tied
    # the output folder is a model folder that loads strictly, with the template it was tuned with
    bundle = load_bundle(frozen_run.out_dir)
    assert "<|im_start|>" in bundle.chat_template
    assert json.load(open(f"{frozen_run.out_dir}/summary.json"))["out_dir"] == frozen_run.out_dir


@pytest.mark.slow
def test_lora_run_merges_into_equal_weights(ray_cluster, tiny_model_dir, tmp_path):
    from safetensors.torch import load_file

    from llm_ray.models.lora import apply_lora
    from llm_ray.finetune.sft import sft

    result = sft(sft_recipe(tmp_path, "lora", tiny_model_dir, "finetune.freeze_embeddings=false", "finetune.freeze_layers=0",
                            "finetune.lora.r=4", "finetune.lora.alpha=8", "optim.lr=1e-2", "train.max_steps=16"))
    s = result.summary
    print(json.dumps(s))
    assert s["eval_loss_after"] < s["eval_loss_before"], s
    assert s["lora"]["base_unchanged"] is True and s["lora"]["merge_max_abs_diff"] <= 1e-5
    # adapter + untouched base, rebuilt here from the two files, equals the merged folder
    base = load_bundle(tiny_model_dir).model
    apply_lora(base, ["q_proj", "k_proj", "v_proj", "o_proj"], r=4, alpha=8)
    adapter = load_file(f"{result.out_dir}/adapter.safetensors")
    missing, unexpected = base.load_state_dict(adapter, strict=False)
    assert not unexpected and all("lora_" not in k for k in missing)
    assert any(v.abs().max() > 0 for k, v in adapter.items() if k.endswith("lora_B"))  # it trained
    merged = load_bundle(result.out_dir).model
    x = torch.randint(0, merged.cfg.vocab_size, (2, 24))
    with torch.no_grad():
        assert (base.eval()(x) - merged(x)).abs().max() <= 1e-5
    # untargeted weights of the merged folder are the base's, bit for bit
    before, after = load_file(f"{tiny_model_dir}/model.safetensors"), load_file(f"{result.out_dir}/model.safetensors")
    untargeted = [k for k in before if not any(t in k for t in ("q_proj", "k_proj", "v_proj", "o_proj"))]
    assert untargeted and all(torch.equal(before[k], after[k]) for k in untargeted)
    assert s["trainable_params"] == sum(v.numel() for v in adapter.values())


@pytest.mark.slow
def test_classification_head_reports_accuracy_and_f1(ray_cluster, tiny_model_dir, tmp_path):
    from llm_ray.bundle import load_classifier
    from llm_ray.finetune.sft import sft

    result = sft(sft_recipe(tmp_path, "clf", tiny_model_dir, "finetune.task=classification",
                            f"finetune.train_path={SENTIMENT}", "finetune.labels=[negative,positive]",
                            "finetune.eval_fraction=0.25", "finetune.freeze_embeddings=false", "finetune.freeze_layers=0",
                            "optim.lr=3e-3", "train.max_steps=30", "data.seq_len=16"))
    s = result.summary
    print(json.dumps(s))
    assert s["eval_examples"] == 12
    assert s["accuracy_after"] >= 0.75 and s["macro_f1_after"] >= 0.7, s  # chance: 0.5
    assert s["eval_loss_after"] < s["eval_loss_before"], s
    model, labels, tok = load_classifier(result.out_dir)
    assert labels == ["negative", "positive"]
    with torch.no_grad():
        logits = model.classify(torch.tensor([tok.encode("The hotel was wonderful.").ids]))
    assert logits.shape == (1, 2) and torch.isfinite(logits).all()
