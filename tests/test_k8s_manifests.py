"""Offline checks of the KubeRay manifests in k8s/.

Schema: the shared strict validator (``../shared/tools/validate_k8s.py`` beside the repo, with the
KubeRay CRDs in ``../shared/kuberay-crds``; a CI clone has shared/ at the same relative place).
Content: what the schema cannot know — every RayJob's entrypoint is a recipe that validates,
token auth is on, checkpoints go to S3 with credentials from a Secret on every Ray container.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "k8s"
SHARED = REPO.parent / "shared"
VALIDATOR = SHARED / "tools" / "validate_k8s.py"
CRDS = SHARED / "kuberay-crds"

needs_validator = pytest.mark.skipif(
    not (VALIDATOR.is_file() and any(CRDS.glob("ray.io_*.yaml"))),
    reason=f"KubeRay validator or CRDs not found at {VALIDATOR} / {CRDS} (shared/ must sit beside the repo)",
)


def _ray_jobs() -> list[tuple[str, dict]]:
    docs = []
    for path in sorted(K8S.glob("*.y*ml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if isinstance(doc, dict) and doc.get("kind") == "RayJob":
                docs.append((path.name, doc))
    return docs


def _ray_containers(job: dict) -> list[dict]:
    spec = job["spec"]["rayClusterSpec"]
    groups = [spec["headGroupSpec"], *spec.get("workerGroupSpecs", [])]
    return [g["template"]["spec"]["containers"][0] for g in groups]


@pytest.fixture(scope="module")
def validated(tmp_path_factory) -> str:
    """One validator run (loading the CRD schemas takes seconds) over k8s/ plus a known-bad
    manifest: RayJob's field name inside a RayService, which a strict schema must reject."""
    pytest.importorskip("jsonschema")
    bad = tmp_path_factory.mktemp("k8s") / "bad-rayservice.yaml"
    bad.write_text(
        "apiVersion: ray.io/v1\nkind: RayService\nmetadata: {name: bad}\n"
        "spec:\n  rayClusterSpec:\n    headGroupSpec: {rayStartParams: {}, template: {spec: {containers: []}}}\n"
    )
    result = subprocess.run(
        [sys.executable, str(VALIDATOR), "--crds", str(CRDS), "k8s", str(bad)],
        capture_output=True, text=True, timeout=120, cwd=REPO,
    )
    return result.stdout + result.stderr


@needs_validator
def test_manifests_pass_the_strict_kuberay_schema(validated):
    manifests = sorted(K8S.glob("*.y*ml"))
    assert manifests
    for path in manifests:
        rel = path.relative_to(REPO)
        assert f"FAIL  {rel}" not in validated, validated
        assert f"ok    {rel}" in validated, validated


@needs_validator
def test_validator_is_strict(validated):
    """Guards against a vacuous pass."""
    assert "FAIL" in validated and "bad-rayservice.yaml" in validated, validated
    assert "1 invalid" in validated, validated


def test_rayjob_entrypoints_are_valid_recipes():
    from llm_ray.config import load_recipe

    jobs = _ray_jobs()
    assert jobs, "no RayJob manifests under k8s/"
    for name, job in jobs:
        argv = shlex.split(job["spec"]["entrypoint"])
        assert argv[:2] == ["python", "jobs/pretrain.py"], (name, argv)
        assert (REPO / argv[2]).is_file(), (name, argv[2])
        assert all(a == "--set" for a in argv[3::2]), (name, argv)
        recipe = load_recipe(str(REPO / argv[2]), argv[4::2])  # raises RecipeError naming the key
        assert recipe.run.storage_path.startswith("s3://"), (name, "multi-node runs need shared storage")
        assert recipe.run.progress_bar is False, name


def test_rayjobs_keep_auth_on_and_clean_up():
    for name, job in _ray_jobs():
        spec = job["spec"]
        assert spec["rayClusterSpec"]["authOptions"]["mode"] == "token", name
        assert spec["shutdownAfterJobFinishes"] is True, name
        assert "rayClusterConfig" not in spec, name  # that is RayService's field


def test_every_ray_container_gets_s3_credentials_from_a_secret():
    for name, job in _ray_jobs():
        for container in _ray_containers(job):
            from_secret = [e["secretRef"]["name"] for e in container.get("envFrom", []) if "secretRef" in e]
            from_keys = [e["name"] for e in container.get("env", []) if "secretKeyRef" in e.get("valueFrom", {})]
            assert from_secret or "AWS_SECRET_ACCESS_KEY" in from_keys, (name, container["name"])
            literal = {e["name"] for e in container.get("env", []) if "value" in e}
            assert not literal & {"AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "RAY_AUTH_TOKEN"}, (name, literal)
