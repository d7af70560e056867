"""`chimera dashboard`: its JSON on a real tiny search (with hurdles, so there are rungs, and
children, so there is lineage), the same as `chimera export` writes; a run read while it is
written; the promoted report; the checks it shares with `chimera serve`; bad RUN arguments."""

import http.client
import json
import math
import random
import shutil
import socket
import time

import pytest

from cluster.cli import main
from cluster.cli.dashboard import open_view
from cluster.serve.dashboard import make_dashboard_server
from cluster.serve.run_view import RunView
from results.db import RunDatabase
from results.export import candidates_table
from search.evolution import Proposal
from search.genome import Genome, genome_changes, get_space
from search.loop import proposal_record
from trainers.candidate import CandidateResult, Status

SEARCH = ["--corpus-size", "60KB", "--tokenizer", "char", "--batch-size", "4", "--seq-len",
          "32", "--population", "2", "--tournament", "2", "--no-live", "--in-process",
          "--max-candidates", "4", "--candidate-steps", "3", "--hurdles", "2"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished tiny search: 2 seeds, 2 children, each trained in 2 rungs (or stopped)."""
    run = tmp_path_factory.mktemp("dashboard") / "run"
    assert main(["evolve", "--run-dir", str(run), *SEARCH]) == 0
    return run


@pytest.fixture(scope="module")
def server(run):
    with make_dashboard_server(open_view(str(run)), "127.0.0.1", 0) as httpd:
        yield httpd


def _get(httpd, path, headers=None):
    conn = http.client.HTTPConnection(*httpd.server_address[:2], timeout=30)
    conn.request("GET", path, headers=headers or {})
    response = conn.getresponse()
    body = response.read()
    conn.close()
    return response, body


def _json(httpd, path, status=200):
    response, body = _get(httpd, path)
    assert response.status == status, body[:300]
    assert response.getheader("Content-Type").startswith("application/json")
    return json.loads(body)


def _records(run):
    db = RunDatabase(run / "results.db", readonly=True)
    try:
        return db.candidate_records(), db.rung_records(), db.counts()
    finally:
        db.close()


def test_run_and_candidates_are_what_export_writes(run, server):
    records, rungs, counts = _records(run)
    info = _json(server, "/api/run")
    assert info["name"] == "run" and info["candidates"] == 4 and info["counts"] == counts
    assert info["settings"]["space"] == "cpu" and info["settings"]["candidate_budget"] == "3 steps"
    assert info["settings"]["hurdles"]["rungs"] == 2 and not info["running"]
    assert info["elapsed_seconds"] > 0 and info["promoted"] is False
    data = _json(server, "/api/candidates")
    exported = candidates_table(records).to_pylist()
    assert len(data["candidates"]) == len(exported) == 4
    for row, want in zip(data["candidates"], exported):
        for key in ("id", "status", "summary", "val_bpb", "params", "tokens_per_second",
                    "wall_seconds", "worker", "parents", "operator", "generation"):
            assert row[key] == want[key], key
        assert [(r["rung"], r["status"], r["steps"], r["val_bpb"]) for r in row["rungs"]] == [
            (r.rung, r.status.value, r.steps, r.val_bpb) for r in rungs
            if r.candidate_id == row["id"]]
    best = min((r for r in data["candidates"] if r["comparable"]), key=lambda r: r["val_bpb"])
    assert info["best"]["id"] == best["id"] and info["best"]["val_bpb"] == best["val_bpb"]
    # one point per rung result, in the order they finished, compute growing
    assert len(data["progress"]) == len(rungs)
    assert [p[0] for p in data["progress"]] == list(range(1, len(rungs) + 1))
    hours = [p[1] for p in data["progress"]]
    assert hours == sorted(hours) and hours[-1] > 0


def test_a_candidate_its_parents_changes_and_lineage(run, server):
    records, _, _ = _records(run)
    by_id = {r.id: r for r in records}
    child = next(r for r in records if r.parents and r.reused_from is None)
    detail = _json(server, f"/api/candidates/{child.id}")
    assert detail["genome"] == child.genome and detail["worker"] == child.worker
    assert [p["id"] for p in detail["parents"]] == list(child.parents)
    first = by_id[child.parents[0]]
    assert detail["parents"][0]["changes"] == genome_changes(
        Genome.from_dict(first.genome), Genome.from_dict(child.genome))
    assert detail["loss_curve"] == [list(p) for p in child.result["loss_curve"]]
    assert detail["rungs"] and detail["timings"]["queued_seconds"] >= 0
    assert detail["timings"]["training_seconds"] == child.wall_seconds
    row = next(r for r in _json(server, "/api/candidates")["candidates"] if r["id"] == child.id)
    assert row["origin"].startswith(f"{child.operator} of {child.parents[0]}")
    lineage = _json(server, f"/api/lineage/{child.id}")
    ids = {node["id"] for node in lineage["nodes"]}
    assert child.id in ids and set(child.parents) <= ids
    assert all(not by_id[i].parents or set(by_id[i].parents) <= ids for i in ids)  # to the roots
    roots = [node for node in lineage["nodes"] if not node["parents"]]
    assert roots and all(node["operator"] in ("seed", "random") for node in roots)


def test_unknown_candidates_and_no_promoted_model_are_json_404s(server):
    for path, words in (("/api/candidates/999", "no candidate 999"),
                        ("/api/lineage/999", "no candidate 999"),
                        ("/api/promoted", "no promoted model"),
                        ("/api/candidates/abc", "no such path"), ("/nope", "no such path")):
        error = _json(server, path, 404)["error"]
        assert words in error["message"], (path, error)


def test_the_promoted_report_and_metrics(run, server):
    promoted = run / "promoted"
    promoted.mkdir()
    try:
        assert _json(server, "/api/promoted")["metrics"] is None  # promote still running
        (promoted / "metrics.json").write_text(json.dumps({"heldout_bpb": 1.5, "params": 10}))
        report = "# Report\n\n<script>alert(1)</script> & more\n"
        (promoted / "report.md").write_text(report)
        assert _json(server, "/api/run")["promoted"] is True  # with no write to the database
        data = _json(server, "/api/promoted")
        assert data["report"] == report and data["metrics"]["heldout_bpb"] == 1.5
        assert data["serve"] == f"chimera serve {promoted}"
    finally:
        shutil.rmtree(promoted)


def test_the_checks_it_shares_with_chimera_serve(server):
    port = server.server_address[1]
    response, body = _get(server, "/api/run", {"Host": f"evil.example:{port}"})
    assert response.status == 421 and "is not this server" in json.loads(body)["error"]["message"]
    response, body = _get(server, "/api/candidates", {"Origin": "http://evil.example"})
    assert response.status == 403 and "other sites" in json.loads(body)["error"]["message"]
    conn = http.client.HTTPConnection(*server.server_address[:2], timeout=30)
    conn.request("POST", "/api/run", b"{}", {"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 405 and "error" in json.loads(response.read())
    conn.close()
    response, body = _get(server, "/")
    assert response.status == 200 and b'<script src="/dashboard.js">' in body
    assert "script-src 'self'" in response.getheader("Content-Security-Policy")
    assert response.getheader("X-Content-Type-Options") == "nosniff"
    script = _get(server, "/dashboard.js")[1].decode()
    assert "innerHTML" not in script and "textContent" in script  # text is never parsed
    assert _get(server, "/dashboard.css")[0].status == 200


def _propose(db, n, parents=()):
    genome = get_space("cpu").sample(random.Random(n))
    return db.record_proposal(proposal_record(Proposal(genome, tuple(parents),
                                                       "mutation" if parents else "random")))


def test_a_run_read_while_it_is_written(tmp_path):
    """The view never stands in the writer's way, sees new candidates within a poll, and a
    diverged loss curve (inf, nan) comes out as JSON nulls."""
    writer = RunDatabase(tmp_path / "results.db")
    writer.set_config({})
    first = _propose(writer, 1)
    view = RunView(RunDatabase(tmp_path / "results.db", readonly=True), "live")
    with make_dashboard_server(view, "127.0.0.1", 0) as httpd:
        assert [r["id"] for r in _json(httpd, "/api/candidates")["candidates"]] == [first]
        started = time.monotonic()
        writer.record_start(first, "node-1")
        second = _propose(writer, 2, parents=[first])
        curve = [(1, 5.0), (11, math.inf), (21, math.nan)]
        writer.record_result(first, {**CandidateResult(Status.DIVERGED, loss_curve=curve)
                                     .to_dict(), "worker": "node-1"})
        assert time.monotonic() - started < 5  # never blocked by the reader
        writer.record_start(second, "node-2")
        deadline = time.monotonic() + 10
        while len(rows := _json(httpd, "/api/candidates")["candidates"]) < 2:
            assert time.monotonic() < deadline, "the new candidate never appeared"
            time.sleep(0.2)
        assert [(r["id"], r["status"], r["worker"]) for r in rows] == [
            (first, "diverged", "node-1"), (second, "running", "node-2")]
        assert _json(httpd, f"/api/candidates/{first}")["loss_curve"] == [
            [1, 5.0], [11, None], [21, None]]
        info = _json(httpd, "/api/run")
        assert info["running"] and info["best"] is None and info["settings"]["space"] is None
    writer.close()


def test_bad_run_arguments_are_one_line_errors(run, tmp_path, capsys):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    no_database = tmp_path / "begun"  # its settings written, its database not (yet)
    no_database.mkdir()
    shutil.copy(run / "run.json", no_database)
    for target, words in ((tmp_path / "missing", "not a run directory"),
                          (not_a_dir, "not a run directory"),
                          (tmp_path, "not a Chimera run (no run.json)"),
                          (no_database, "no run database")):
        assert main(["dashboard", str(target)]) == 2
        err = capsys.readouterr().err
        assert str(target) in err and words in err and "Traceback" not in err
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["dashboard", str(run), "--port", str(port)]) == 2
        assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err
    with pytest.raises(SystemExit) as usage:  # refused by argparse, naming the flag
        main(["dashboard", str(tmp_path), "--port", "70000"])
    assert usage.value.code == 2 and "--port" in capsys.readouterr().err
