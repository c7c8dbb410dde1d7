"""``ray job submit`` end to end against a real head node started with ``ray start --head``.

The module's cluster lives beside the session ``ray_cluster`` fixture (``ray.init`` in this
pytest process) and whatever else runs Ray on the machine, so it is isolated on purpose:

- its own ports (GCS, dashboard, client server, dashboard agent) and its own ``--temp-dir``
  (short, under /tmp: Unix socket paths are limited to 107 bytes);
- its own auth token file through ``RAY_AUTH_TOKEN_PATH`` (``~/.ray/auth_token`` is not touched),
  with ``RAY_AUTH_MODE=token`` on the cluster and on the ``ray job`` client;
- ``RAY_ADDRESS`` in the cluster processes' environment: with two clusters on one machine, Ray
  internals that look the cluster up without an address (Ray Train's PlacementGroupCleaner via the
  state API) otherwise fail with "Found multiple active Ray instances".

Teardown never runs ``ray stop``: it kills every Ray process on the machine, the session cluster
and other people's runs included. ``ray start --block`` runs in a session of its own; SIGTERM makes
it kill the processes it started (``RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=0`` skips the 30 s node
drain), then its process group gets SIGKILL, then a /proc sweep kills leftovers whose command line
or cwd lies in the temp dir (job drivers run in their own session, cwd inside the temp dir).

Run as a script (``python tests/test_job_submit.py probe``) this file is the probe job that shows
where Ray workers import ``llm_ray`` from.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray")) if Path(sys.executable).with_name("ray").exists() else "ray"


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _kill_leftovers(root: str) -> None:
    """SIGKILL processes whose command line or cwd lies under ``root`` (Linux /proc only)."""
    if not os.path.isdir("/proc"):
        return
    me = os.getpid()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        if int(pid) == me:
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            cwd = os.readlink(f"/proc/{pid}/cwd")
        except OSError:
            continue
        if root in cmd or cwd.startswith(root):
            try:
                os.kill(int(pid), signal.SIGKILL)
            except OSError:
                pass


class HeadNode:
    """``ray start --head --block`` in its own session, temp dir, ports and token."""

    def __init__(self):
        self.root = tempfile.mkdtemp(prefix="llmray-job-", dir="/tmp")
        gcs, dash, client, agent = _free_ports(4)
        self.gcs_address = f"127.0.0.1:{gcs}"
        self.dashboard = f"http://127.0.0.1:{dash}"
        token = Path(self.root, "auth_token")
        token.write_text(secrets.token_hex(32))
        token.chmod(0o600)
        base = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH") and k != "RAY_ADDRESS"}
        # The job's `python` is looked up on PATH by the job supervisor: make it this interpreter
        # (CI runs `.venv/bin/python -m pytest` without activating the venv).
        base["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), base.get("PATH", "")])
        base.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token), RAY_USAGE_STATS_ENABLED="0",
                    DS_ACCELERATOR="cpu", TOKENIZERS_PARALLELISM="false")
        self.client_env = dict(base)  # what a user's shell needs: auth mode and the token
        cluster_env = dict(base, RAY_ADDRESS=self.gcs_address, RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0")
        self.log = open(Path(self.root, "ray-start.log"), "w")
        self.proc = subprocess.Popen(
            [RAY, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}",
             "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", f"--ray-client-server-port={client}",
             f"--dashboard-agent-listen-port={agent}", "--num-cpus=4", "--disable-usage-stats",
             f"--temp-dir={self.root}/ray"],
            cwd=self.root, env=cluster_env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
        )

    def wait_ready(self, timeout: float = 60) -> None:
        """Until the job API answers (401 without a token also means it is up)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray start exited with {self.proc.returncode}: {self.start_log()}")
            try:
                urllib.request.urlopen(f"{self.dashboard}/api/version", timeout=2)
                return
            except urllib.error.HTTPError:
                return
            except OSError:
                time.sleep(0.5)
        raise TimeoutError(f"dashboard {self.dashboard} not up after {timeout}s: {self.start_log()}")

    def start_log(self) -> str:
        self.log.flush()
        return Path(self.root, "ray-start.log").read_text()[-3000:]

    def ray(self, *args: str, out: Path) -> subprocess.Popen:
        """Start a ``ray`` CLI command as a user's shell would run it; output to ``out``."""
        with open(out, "w") as f:
            return subprocess.Popen([RAY, *args], cwd=REPO, env=self.client_env, stdout=f, stderr=subprocess.STDOUT)

    def submit(self, submission_id: str, entrypoint: list[str], out: Path) -> subprocess.Popen:
        return self.ray("job", "submit", "--address", self.dashboard, "--submission-id", submission_id,
                        "--working-dir", ".", "--runtime-env", "jobs/runtime_env.yaml", "--", *entrypoint, out=out)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except OSError:
            pass
        self.proc.wait()
        _kill_leftovers(self.root)
        self.log.close()
        shutil.rmtree(self.root, ignore_errors=True)


def _tail(result: subprocess.CompletedProcess) -> str:
    return f"exit {result.returncode}\n--- stdout\n{result.stdout[-4000:]}\n--- stderr\n{result.stderr[-4000:]}"


def _last_line(text: str) -> str:
    return [line for line in text.splitlines() if line.strip()][-1].strip()


# --------------------------------------------------------------------------- without a cluster


def test_invalid_recipe_fails_fast_naming_the_key(tmp_path):
    """Validation happens before any Ray work: no cluster, no RAY_ADDRESS, exit 2 within seconds."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    for override, key in (("parallel.zero_stage=7", "parallel.zero_stage"), ("train.max_stepz=4", "train.max_stepz")):
        started = time.time()
        result = subprocess.run(
            [sys.executable, str(REPO / "jobs" / "pretrain.py"), str(REPO / "jobs" / "recipes" / "tiny-cpu.yaml"),
             "--set", override],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60,
        )
        assert result.returncode == 2, _tail(result)
        assert key in result.stderr, _tail(result)
        assert time.time() - started < 20
        assert not (tmp_path / "runs").exists()


# --------------------------------------------------------------------------- on a `ray start` cluster

@pytest.fixture(scope="module")
def head_node():
    node = HeadNode()
    try:
        node.wait_ready()
        yield node
    finally:
        node.stop()


@dataclass
class Job:
    returncode: int  # of `ray job submit`: 0 when the job SUCCEEDED, 1 when it FAILED
    output: str  # what `ray job submit` printed (it tails the job's logs)
    logs: str  # `ray job logs`: the job driver's stdout and stderr
    wall_s: float


@pytest.fixture(scope="module")
def job_tmp(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("job-submit")


@pytest.fixture(scope="module")
def jobs(head_node, job_tmp) -> dict[str, Job]:
    """Three jobs submitted at once through the CLI (the cluster has 4 CPUs): a short pretrain,
    the import probe, and an invalid recipe. Concurrent to keep the module near a minute."""
    from conftest import tiny_overrides

    tmp = job_tmp
    # data.paths stays the recipe's relative jobs/data/tiny_corpus.txt: read from the uploaded
    # working dir. The tokenizer does not exist yet: the job trains it.
    overrides = [o for o in tiny_overrides(tmp / "runs", "job-submit", str(tmp / "tok.json"))
                 if not o.startswith("data.paths=")]
    overrides += ["train.max_steps=4", "checkpoint.every_steps=2"]
    recipe = ["python", "jobs/pretrain.py", "jobs/recipes/tiny-cpu.yaml"]
    entrypoints = {
        "pretrain-ok": recipe + [a for o in overrides for a in ("--set", o)],
        "probe": ["python", "tests/test_job_submit.py", "probe"],
        "pretrain-bad": recipe + ["--set", "parallel.zero_stage=7"],
    }
    started = time.time()
    procs = {sid: head_node.submit(sid, ep, tmp / f"{sid}.submit.txt") for sid, ep in entrypoints.items()}
    try:
        done: dict[str, float] = {}
        while len(done) < len(procs) and time.time() - started < 300:
            for sid, proc in procs.items():
                if sid not in done and proc.poll() is not None:
                    done[sid] = time.time() - started
            time.sleep(0.5)
        assert len(done) == len(procs), f"jobs still running after 300 s: {set(procs) - set(done)}"
        returncodes = {sid: proc.returncode for sid, proc in procs.items()}
        procs = {sid: head_node.ray("job", "logs", "--address", head_node.dashboard, sid, out=tmp / f"{sid}.logs.txt")
                 for sid in entrypoints}
        for proc in procs.values():
            proc.wait(timeout=60)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
    return {
        sid: Job(returncodes[sid], (tmp / f"{sid}.submit.txt").read_text(),
                 (tmp / f"{sid}.logs.txt").read_text(), done[sid])
        for sid in entrypoints
    }


def test_pretrain_job_succeeds(jobs, job_tmp):
    job, run_dir = jobs["pretrain-ok"], job_tmp / "runs" / "job-submit"
    assert job.returncode == 0, job.output[-4000:]
    assert "Job 'pretrain-ok' succeeded" in job.output
    assert _last_line(job.logs) == str(run_dir), job.logs[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 4
    assert math.isfinite(summary["initial_loss"]) and math.isfinite(summary["final_loss"])
    assert summary["final_loss"] < summary["initial_loss"], summary
    assert summary["checkpoint"] and Path(summary["checkpoint"]).is_dir()


def test_job_runs_the_uploaded_code(jobs, head_node):
    """The driver and the job's Ray workers import llm_ray from the unpacked working_dir, which
    comes first on their PYTHONPATH: no installed copy is needed on the nodes."""
    assert f"llm_ray from {head_node.root}/ray/" in jobs["pretrain-ok"].logs, jobs["pretrain-ok"].logs[-3000:]
    probe = jobs["probe"]
    assert probe.returncode == 0, probe.output[-4000:]
    where = json.loads(_last_line(probe.logs))
    assert where["task"].startswith(f"{head_node.root}/ray/"), where
    assert "/working_dir_files/" in where["task"], where
    assert where["task"] == where["driver"], where


def test_upload_leaves_out_git_venv_and_runs(jobs, head_node):
    unpacked = Path(json.loads(_last_line(jobs["probe"].logs))["task"]).parent
    assert (unpacked / "jobs" / "pretrain.py").is_file()
    for name in (".git", ".venv", "runs"):
        assert not (unpacked / name).exists(), name


def test_invalid_recipe_job_fails_naming_the_key(jobs):
    job = jobs["pretrain-bad"]
    assert job.returncode == 1, job.output[-4000:]
    assert "Job 'pretrain-bad' failed" in job.output
    assert "invalid recipe: parallel.zero_stage" in job.logs, job.logs
    assert job.wall_s < 60


def _probe() -> None:
    """Job entrypoint: where do the driver and a Ray task import llm_ray from?"""
    import ray

    ray.init()

    @ray.remote(num_cpus=1)
    def where() -> str:
        import llm_ray

        return str(Path(llm_ray.__file__).resolve().parent)

    import llm_ray

    print(json.dumps({"driver": str(Path(llm_ray.__file__).resolve().parent), "task": ray.get(where.remote())}))


if __name__ == "__main__" and sys.argv[1:] == ["probe"]:
    _probe()
