"""The Ray evaluator on a simulated two-node cluster: workers killed, nodes lost, workers hung,
candidates too large for any node, and the token store reaching each node once.

Every search here ends with each candidate accounted for in the run database: finished (ok, or
failed after its retries, or rejected) with its number of attempts; none left running.
"""

import json
import os
import signal
import time

import pytest
import ray
from ray.cluster_utils import Cluster

from chimera.kernels import fused_ops
from chimera.tokenizer import train_char
from cluster.ray.evaluator import RayEvaluator
from cluster.ray.node_store import StoreTransfer, ship_store
from cluster.ray.worker import CandidateSettings, FaultPolicy
from results.db import RunDatabase
from search.evolution import Proposal
from search.genome import Genome
from search.loop import SearchLimits, SearchLoop
from trainers.candidate import BudgetKind, TrainBudget, TrainHparams
from trainers.corpus import CorpusSpec, iter_documents
from trainers.store import prepare_store

GiB = 2**30
NODE_MEMORY = 3 * GiB  # what each simulated node offers candidates
# A seconds budget makes every candidate last about as long, whatever its size, so a fault can
# be injected while one is surely training.
SETTINGS = dict(budget=TrainBudget(BudgetKind.SECONDS, 3.0),
                hparams=TrainHparams(batch_size=4, seq_len=32, eval_batches=2), seed=0)
FAST_FAULTS = FaultPolicy(max_attempts=3, heartbeat_seconds=0.5, hang_seconds=4.0)


def _genomes(count):
    """Distinct small genomes (a repeated genome would be reused, not trained)."""
    return [Genome(d_model=32 + 16 * i, n_layers=2, n_heads=2, n_kv_heads=1, ffn_multiplier=2.0,
                   recurrence_ratio=1, window_size=16, dropout=0.0) for i in range(count)]


class FixedStrategy:
    """Proposes the given genomes in order; remembers what it was told."""

    def __init__(self, genomes):
        self.genomes, self.told = list(genomes), {}

    def ask(self):
        return Proposal(self.genomes.pop(0), operator="seed") if self.genomes else None

    def tell(self, candidate_id, proposal, fitness, rung=0):
        self.told[candidate_id] = fitness

    def plan(self, expected_candidates):
        pass  # a fixed list has no population to size


def _add_node(cluster):
    # Two logical CPUs per node: a worker lost with its node can restart on the survivor.
    cluster.add_node(num_cpus=2, memory=NODE_MEMORY)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    corpus = CorpusSpec("stories", stories_bytes=40_000, seed=0)
    tokenizer = train_char(iter_documents(corpus))
    return prepare_store(corpus, tokenizer, tmp_path_factory.mktemp("s") / "store")[0]


@pytest.fixture(scope="module")
def simulated_cluster():
    # As `chimera evolve` does: build the CPU kernels here, not in workers whose first minute
    # of compiling would read as a hang under FAST_FAULTS (and which these tests kill).
    fused_ops()
    # Fast health checks: a crashed node is declared dead in about a second, not half a minute.
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "_system_config": {"health_check_period_ms": 200,
                                          "health_check_failure_threshold": 5}})
    ray.init(address=cluster.address, log_to_driver=False)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture
def two_nodes(simulated_cluster):
    """The simulated cluster with two worker nodes (a test may have removed one)."""
    while len(simulated_cluster.worker_nodes) < 2:
        _add_node(simulated_cluster)
    simulated_cluster.wait_for_nodes()
    deadline = time.monotonic() + 60
    while sum(node["Alive"] for node in ray.nodes()) != 3:  # a removed node is declared dead
        assert time.monotonic() < deadline, "the cluster did not settle"
        time.sleep(0.2)
    return simulated_cluster


def _settings(store):
    return CandidateSettings(store_dir=str(store.root), vocab_size=store.vocab_size, **SETTINGS)


def _search(evaluator, db, genomes, inject, limits=None):
    """Run a search over ``genomes``; ``inject(evaluator)`` is called on every tick."""
    strategy = FixedStrategy(genomes)
    loop = SearchLoop(strategy, evaluator, db, limits or SearchLimits(max_candidates=len(genomes)),
                      on_tick=lambda: inject(evaluator), poll_seconds=0.2)
    try:
        report = loop.run()
    finally:
        evaluator.close()
    return report, strategy


def _training_for(evaluator, seconds):
    """(candidate id, worker) of a candidate that has trained at least ``seconds``, or None."""
    for name, (_, job) in evaluator.busy.items():
        if time.monotonic() - job.started >= seconds:
            return job.candidate_id, evaluator.workers[name]
    return None


def _accounted(db, count):
    rows = db.candidates()
    assert len(rows) == count
    assert not db.unfinished(), "every candidate finished: none pending, running or cancelled"
    return {row["id"]: row for row in rows}


def test_killed_actor_mid_candidate_is_retried_on_another_worker(two_nodes, store, tmp_path):
    db = RunDatabase(tmp_path / "results.db")
    evaluator = RayEvaluator(_settings(store), 2, 1.0, faults=FAST_FAULTS)
    victims = []

    def kill_once(ev):
        found = None if victims else _training_for(ev, 1.0)
        if found:
            victims.append(found[0])
            ray.kill(found[1].actor, no_restart=True)

    report, _ = _search(evaluator, db, _genomes(4), kill_once)
    rows = _accounted(db, 4)
    assert victims and report.statuses == {"ok": 4}
    victim = rows[victims[0]]
    assert victim["status"] == "ok" and victim["attempts"] == 2
    assert "worker lost" in victim["result"]
    assert all(row["attempts"] == 1 for cid, row in rows.items() if cid != victims[0])


def test_lost_node_mid_search_retries_its_candidate_elsewhere(two_nodes, store, tmp_path):
    db = RunDatabase(tmp_path / "results.db")
    evaluator = RayEvaluator(_settings(store), 2, 1.0, faults=FAST_FAULTS)
    lost = []  # (candidate id, node id)

    def remove_node_once(ev):
        found = None if lost else _training_for(ev, 1.0)
        if found:
            node_id = found[1].info["node_id"]
            lost.append((found[0], node_id))
            node = next(n for n in two_nodes.worker_nodes if n.node_id == node_id)
            two_nodes.remove_node(node, allow_graceful=False)  # a crash, not a drain

    report, _ = _search(evaluator, db, _genomes(4), remove_node_once)
    rows = _accounted(db, 4)
    assert lost and report.statuses == {"ok": 4}
    victim = rows[lost[0][0]]
    assert victim["attempts"] == 2
    assert "worker lost" in victim["result"] or "worker hung" in victim["result"]
    assert json.loads(victim["result"])["node_id"] != lost[0][1]  # retried on the survivor


def test_hung_worker_is_detected_killed_and_its_candidate_retried(two_nodes, store, tmp_path):
    db = RunDatabase(tmp_path / "results.db")
    evaluator = RayEvaluator(_settings(store), 2, 1.0, faults=FAST_FAULTS)
    frozen = []

    def freeze_once(ev):  # SIGSTOP: the process neither trains nor answers heartbeats
        found = None if frozen else _training_for(ev, 1.0)
        if found:
            frozen.append((found[0], found[1].info["pid"]))
            os.kill(found[1].info["pid"], signal.SIGSTOP)

    try:
        started = time.monotonic()
        report, _ = _search(evaluator, db, _genomes(3), freeze_once)
        elapsed = time.monotonic() - started
    finally:
        for _, pid in frozen:  # never leave a stopped process behind
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    rows = _accounted(db, 3)
    victim = rows[frozen[0][0]]
    assert report.statuses == {"ok": 3}
    assert victim["attempts"] == 2 and "worker hung: no heartbeat" in victim["result"]
    assert elapsed < 60, "the hung worker was not waited on forever"


def test_retries_are_bounded_then_the_candidate_is_recorded_failed(two_nodes, store, tmp_path):
    db = RunDatabase(tmp_path / "results.db")
    faults = FaultPolicy(max_attempts=2, heartbeat_seconds=0.5, hang_seconds=4.0)
    evaluator = RayEvaluator(_settings(store), 2, 1.0, faults=faults)
    cursed = []

    def kill_every_attempt(ev):  # the first candidate seen training dies on every worker
        if not cursed:
            found = _training_for(ev, 0.5)
            if found:
                cursed.append(found[0])
        actor = ev.worker_of(cursed[0]) if cursed else None
        if actor is not None and _training_for(ev, 0.5):
            ray.kill(actor, no_restart=True)

    report, strategy = _search(evaluator, db, _genomes(3), kill_every_attempt)
    rows = _accounted(db, 3)
    failed = rows[cursed[0]]
    assert failed["status"] == "failed" and failed["attempts"] == 2
    assert "gave up after 2 attempts" in failed["error"]
    assert failed["error"].count("worker lost") == 2
    assert strategy.told[cursed[0]] == float("inf")
    assert report.statuses == {"ok": 2, "failed": 1}


def test_candidate_too_large_for_any_node_is_rejected_before_launch(two_nodes, store, tmp_path):
    db = RunDatabase(tmp_path / "results.db")
    evaluator = RayEvaluator(_settings(store), 2, 1.0, faults=FAST_FAULTS)
    assert evaluator.memory_limit == NODE_MEMORY
    huge = Genome(d_model=2048, n_layers=24, n_heads=16, n_kv_heads=4, ffn_multiplier=4.0,
                  recurrence_ratio=3, window_size=1024, dropout=0.0)  # ~1.5B parameters
    genomes = [_genomes(1)[0], huge]
    report, strategy = _search(evaluator, db, genomes, lambda ev: None)
    rows = _accounted(db, 2)
    rejected = [row for row in rows.values() if row["status"] == "rejected"]
    assert len(rejected) == 1 and rejected[0]["summary"].startswith("d2048")
    assert "GiB to train" in rejected[0]["error"] and "the largest node offers 3.00 GiB" \
        in rejected[0]["error"]
    assert rejected[0]["attempts"] == 0 and rejected[0]["started_at"] is None  # never launched
    assert report.rejected == 1 and strategy.told[rejected[0]["id"]] == float("inf")


def test_store_reaches_each_node_once_and_its_actors_share_it(two_nodes, store, tmp_path):
    if True:  # two nodes, two workers each
        source = ship_store(store.root, StoreTransfer.COPY, str(tmp_path / "node-stores"))
        evaluator = RayEvaluator(_settings(store), 4, 1.0, store=source)
        assert evaluator.wait_until_started(timeout=60) == 4
        infos = [w.info for w in evaluator.workers.values()]
        by_node = {}
        for info in infos:
            by_node.setdefault(info["node_id"], []).append(info)
        assert len(by_node) == 2 and all(len(v) == 2 for v in by_node.values())  # SPREAD
        for node_infos in by_node.values():
            origins = sorted(info["store_origin"] for info in node_infos)
            assert origins == ["copied", "node-cache"]  # written once, then mapped
            assert len({info["store_path"] for info in node_infos}) == 1
        assert len({info["store_path"] for info in infos}) == 2  # one copy per node
        copies = list((tmp_path / "node-stores").glob("node-*/*/meta.json"))
        assert len(copies) == 2
        assert all(p.read_bytes() == (store.root / "meta.json").read_bytes() for p in copies)
        evaluator.close()


def test_fractional_gpus_pack_two_workers_on_one_gpu(two_nodes, store):
    """Placement only (this machine has no GPU): a node advertising one GPU takes both workers
    asking for half a GPU each, and Ray hands both the same device. Runs last: it adds a node."""
    gpu_node = two_nodes.add_node(num_cpus=2, num_gpus=1, memory=NODE_MEMORY)
    try:
        evaluator = RayEvaluator(_settings(store), 2, 1.0, gpus_per_candidate=0.5)
        try:
            assert evaluator.wait_until_started(timeout=60) == 2
            infos = [w.info for w in evaluator.workers.values()]
            assert {info["node_id"] for info in infos} == {gpu_node.node_id}
            assert [info["gpu_ids"] for info in infos] == [["0"], ["0"]]
        finally:
            evaluator.close()
    finally:
        two_nodes.remove_node(gpu_node)
