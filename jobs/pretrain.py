"""Job entrypoint: pretrain one recipe on the Ray cluster this process is started in.

    ray job submit --address http://HEAD:8265 --working-dir . \
        --runtime-env jobs/runtime_env.yaml -- \
        python jobs/pretrain.py jobs/recipes/tiny-cpu.yaml --set train.max_steps=100

Under ``ray job submit`` RAY_ADDRESS is set and the launcher connects to that cluster; run
directly, it starts a local Ray. The recipe is loaded and validated before any Ray work: an
invalid one exits with code 2 and names the key. Prints the summary JSON, then the run folder on
the last line (as ``llm-ray pretrain`` does).

llm_ray need not be pip-installed on the cluster: the job's working_dir (the repo root) is
unpacked on every node and put first on PYTHONPATH of the driver and of every Ray worker of the
job (Ray Train workers included). The sys.path line below covers ``python jobs/pretrain.py``,
where Python puts ``jobs/`` rather than the repo root on the path.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
# A local Ray started by this process (no RAY_ADDRESS) spawns workers that inherit this env.
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="jobs/pretrain.py", description=__doc__.splitlines()[0])
    parser.add_argument("recipe", help="YAML recipe, e.g. jobs/recipes/tiny-cpu.yaml (relative to the working dir)")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. train.max_steps=100"
    )
    args = parser.parse_args(argv)

    from llm_ray.config import RecipeError, load_recipe

    try:
        recipe = load_recipe(args.recipe, args.set)
    except RecipeError as e:
        print(f"jobs/pretrain.py: invalid recipe: {e}", file=sys.stderr, flush=True)
        return 2

    import llm_ray
    from llm_ray.train.launcher import pretrain

    # Which copy of the code runs (the job's unpacked working_dir, or an installed package).
    print(f"jobs/pretrain.py: llm_ray from {Path(llm_ray.__file__).parent}", file=sys.stderr, flush=True)
    result = pretrain(recipe)
    print(json.dumps(result.summary, indent=2))
    print(result.run_dir, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
