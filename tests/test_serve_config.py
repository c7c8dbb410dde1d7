"""Serving's configuration without a running endpoint: the serve recipe against Ray Serve's own
schemas, bad keys named, FastAPI's validation errors in OpenAI's shape, the rate limiter."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


def test_serve_config_file_validates_against_ray_serve_schema():
    from ray.serve.schema import ServeDeploySchema

    from llm_ray.config.loader import from_dict
    from llm_ray.config.serve import ServeConfig, load_serve_config

    raw = yaml.safe_load((REPO / "jobs" / "serve_config.yaml").read_text())
    schema = ServeDeploySchema.model_validate(raw)
    app = schema.applications[0]
    assert app.import_path == "llm_ray.serve.app:build_app"
    cfg = from_dict(ServeConfig, app.args, "serve")  # the builder's args are a valid serve section
    assert cfg.model == "smollm2" and cfg.num_replicas is None and cfg.autoscaling.max_replicas == 4
    # The RayService manifest carries the same application.
    service = yaml.safe_load((REPO / "k8s" / "rayservice-smollm2.yaml").read_text())
    assert ServeDeploySchema.model_validate(yaml.safe_load(service["spec"]["serveConfigV2"])).applications[0].args == app.args
    # Options Serve gets from the recipe pass Serve's own deployment schema.
    from ray.serve.schema import DeploymentSchema

    recipe = load_serve_config(str(REPO / "jobs" / "recipes" / "serve-smollm2.yaml"))
    DeploymentSchema.model_validate({"name": "LLMServer", **recipe.deployment_options()})
    assert recipe.deployment_options()["autoscaling_config"]["target_ongoing_requests"] == 16
    # What `serve deploy` calls: the builder accepts the args, or a recipe path plus overrides.
    from ray.serve import Application

    from llm_ray.serve.app import build_app

    assert isinstance(build_app(app.args), Application)
    assert isinstance(build_app({"recipe": str(REPO / "jobs" / "recipes" / "serve-smollm2.yaml"), "max_batch_size": 8}), Application)


@pytest.mark.parametrize(
    "override, key",
    [
        ("serve.max_batch_size=0", "serve.max_batch_size"),
        ("serve.autoscaling.max_replicas=0", "serve.autoscaling.max_replicas"),
        ("serve.route_prefix=v1", "serve.route_prefix"),
        ("serve.dtype=fp8", "serve.dtype"),
        ("serve.max_batchsize=4", "serve.max_batchsize"),
    ],
)
def test_bad_serve_recipe_names_the_key(override, key):
    from llm_ray.config import RecipeError
    from llm_ray.config.serve import load_serve_config

    with pytest.raises(RecipeError) as e:
        load_serve_config(str(REPO / "jobs" / "recipes" / "serve-smollm2.yaml"), [override])
    assert e.value.key == key


def test_fastapi_validation_errors_answer_422_in_the_openai_shape():
    """Our routes parse bodies themselves and answer 400 as OpenAI does; a validation error
    FastAPI raises itself (a typed parameter) still answers in OpenAI's shape, naming the field."""
    import asyncio

    from fastapi.exceptions import RequestValidationError

    from llm_ray.serve.app import _validation_error

    exc = RequestValidationError([{"loc": ("body", "messages", 0, "content"), "msg": "Field required", "type": "missing"}])
    resp = asyncio.run(_validation_error(None, exc))
    body = json.loads(resp.body)
    assert resp.status_code == 422
    assert body["error"]["param"] == "messages.0.content" and "Field required" in body["error"]["message"]
    assert set(body["error"]) == {"message", "type", "param", "code"}


def test_rate_limiter_is_a_sliding_minute_per_caller():
    from llm_ray.serve.app import RateLimiter

    r = RateLimiter(2)
    assert r.admit("a", 0.0) == 0 and r.admit("a", 10.0) == 0
    assert r.admit("a", 20.0) == pytest.approx(40.0)  # full: the request of t=0 leaves at t=60
    assert r.admit("b", 20.0) == 0  # another caller has its own window
    assert r.admit("a", 60.5) == 0 and r.admit("a", 61.0) == pytest.approx(9.0)
