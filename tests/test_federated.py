"""``llm-ray federated`` end to end: real Ray actors, DeepSpeed on CPU, secure aggregation, a
client process killed mid-round."""

from __future__ import annotations

import json

import pytest

from conftest import REPO, tiny_overrides

RECIPE = str(REPO / "jobs/recipes/federated-tiny.yaml")


def test_four_non_iid_clients_with_secure_aggregation_survive_a_dropped_client(ray_cluster, tokenizer_paths, tmp_path, capsys):
    from llm_ray.bundle import load_bundle
    from llm_ray.cli import main
    from llm_ray.privacy.federated import heldout_ids, heldout_loss

    sets = tiny_overrides(tmp_path, "fed", tokenizer_paths["bpe"]) + [
        "federated.rounds=3", "federated.local_steps=3", "federated.fail_client=1", "federated.fail_round=2",
        "federated.dirichlet_alpha=0.3", "federated.cpus_per_client=0.5", "federated.heldout_blocks=16",
    ]
    main(["federated", RECIPE, *sum((["--set", s] for s in sets), [])])
    out_dir = capsys.readouterr().out.strip().splitlines()[-1]  # the run folder, last
    summary = json.loads((tmp_path / "fed" / "summary.json").read_text())
    assert out_dir == summary["run_dir"] == str(tmp_path / "fed")

    first, second, third = summary["history"]
    assert first["clients"] == [0, 1, 2, 3] and first["unmasked_dropped"] == []
    # client 1's process exited mid-training in round 2, after the key exchange: its pairwise
    # masks were removed from the others' shares and the round was applied with three updates
    assert second["clients"] == [0, 2, 3] and second["dropped"] == {"1": "died"} and second["unmasked_dropped"] == [1]
    assert second["applied"]
    assert third["revived"] == [1] and third["clients"] == [0, 1, 2, 3]
    assert summary["heldout_loss_final"] < summary["heldout_loss_initial"] - 0.1  # FedAvg learns
    assert all(0 < h["secagg_share"] < 1 for h in summary["history"])

    shards = summary["client_shards"]  # non-IID: the clients' topic mixes differ
    assert sum(s["documents"] for s in shards) == 2608
    mixes = [[c / s["documents"] for c in s["topics"]] for s in shards]
    assert max(abs(a - b) for a, b in zip(mixes[0], mixes[1])) > 0.2

    bundle = load_bundle(summary["model_dir"])  # the final global model is a model folder
    recipe_heldout = REPO / "jobs/data/eval/pydoc_heldout.txt"
    ids = heldout_ids(bundle.tokenizer, str(recipe_heldout), 16 * 32)
    assert heldout_loss(bundle.model, ids, 32) == pytest.approx(summary["heldout_loss_final"], rel=1e-4)


def test_federated_refusals_are_one_line_before_ray(tokenizer_paths, tmp_path, capsys):
    from llm_ray.cli import main

    base = tiny_overrides(tmp_path, "bad", tokenizer_paths["bpe"])
    for override, key in (("parallel.zero_stage=2", "parallel.zero_stage"),
                          ("federated.heldout=/nonexistent.txt", "federated.heldout"),
                          ("privacy.dp.enabled=true", "privacy.dp.enabled")):
        extra = [override] + (["privacy.dp.noise_multiplier=1.0", "optim.grad_clip=0"] if "dp" in override else [])
        with pytest.raises(SystemExit) as e:
            main(["federated", RECIPE, *sum((["--set", s] for s in base + extra), [])])
        assert e.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and key in err[0], err
    assert not (tmp_path / "bad").exists()
