"""`ray job submit` against a real head started with `ray start --head` on 127.0.0.1: a short
evolve runs as a Ray job, succeeds, and leaves its results database behind."""

import json
import os
import re
import secrets
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _ray(*args, env, check=True, timeout=120):
    return subprocess.run([str(BIN / "ray"), *args], env=env, capture_output=True, text=True,
                          check=check, timeout=timeout)


@pytest.fixture
def ray_head():
    """A real single-node head; yields (dashboard address, environment for the ray CLI)."""
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # socket paths must stay short
    env = {key: value for key, value in os.environ.items() if not key.startswith("RAY_ADDRESS")}
    # The CLI must find `chimera` and the same Python; the cluster gets its own token.
    env.update(PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", RAY_AUTH_MODE="token",
               RAY_AUTH_TOKEN=secrets.token_hex(32), RAY_USAGE_STATS_ENABLED="0")
    dashboard = _free_port()
    _ray("start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(_free_port()),
         "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard), "--num-cpus", "2",
         "--temp-dir", temp_dir, "--disable-usage-stats", env=env)
    try:
        yield f"http://127.0.0.1:{dashboard}", env
    finally:
        _ray("stop", "--force", env=env, check=False)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _job(address: str, env, job_id: str, what: str = "") -> dict:
    """The Jobs REST API (what `ray job status` and `ray job logs` call)."""
    request = urllib.request.Request(f"{address}/api/jobs/{job_id}{what}", headers={
        "Authorization": f"Bearer {env['RAY_AUTH_TOKEN']}"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)


def test_ray_job_submit_runs_evolve_to_success(ray_head, tmp_path):
    address, env = ray_head
    run = tmp_path / "job-run"  # absolute: the job runs in a copy of the working directory
    job_id = f"chimera-test-{secrets.token_hex(4)}"
    _ray("job", "submit", "--address", address, "--working-dir", str(REPO), "--submission-id",
         job_id, "--no-wait", "--", "chimera", "evolve", "--address", "auto",
         "--run-dir", str(run), "--max-candidates", "3", "--candidate-steps", "5",
         "--corpus-size", "60KB", "--tokenizer", "char", "--batch-size", "4", "--seq-len", "32",
         "--population", "4", "--tournament", "2", env=env)
    deadline = time.monotonic() + 300
    status = _job(address, env, job_id)["status"]
    while status not in TERMINAL and time.monotonic() < deadline:
        time.sleep(1)
        status = _job(address, env, job_id)["status"]
    logs = _job(address, env, job_id, "/logs")["logs"]
    assert status == "SUCCEEDED", f"job ended {status}:\n{logs[-3000:]}"
    # Without a terminal the live view becomes one line per event in the job's log.
    assert re.search(r"#\d+ ok: \d\.\d{4} bpb", logs) and "leaderboard of" in logs
    with sqlite3.connect(run / "results.db") as conn:
        statuses = [row[0] for row in conn.execute("SELECT status FROM candidates")]
        workers = {row[0] for row in conn.execute("SELECT worker FROM candidates")}
    assert statuses == ["ok"] * 3
    assert all(name.startswith("job-run-worker-") for name in workers)  # named actors
