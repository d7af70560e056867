"""`chimera dashboard` in headless Chromium: the page polls a run that is being written, a new
candidate appears in the leaderboard, a click opens its view (parents and what changed, loss
curve), the charts are drawn, the promoted report is shown, and text from the run (a worker's
name with markup in it) stays text; and the page of a real search grows as its candidates
finish. Screenshots are kept as test artifacts (``$ARTIFACTS_DIR`` or ``test-artifacts/``, as
``test_browser.py`` keeps the chat page's); their paths are printed."""

import os
import random
from pathlib import Path

import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select, WebDriverWait

from cluster.serve.dashboard import make_dashboard_server
from cluster.serve.run_view import RunView
from results.db import RunDatabase
from search.evolution import Proposal
from search.genome import get_space
from search.loop import proposal_record
from trainers.candidate import CandidateResult, Status

MARKUP = "<img src=x onerror=\"document.title='pwned'\">"


class Run:
    """A run database written by this test as a search would write it."""

    def __init__(self, path: Path) -> None:
        self.db = RunDatabase(path / "results.db")
        self.db.set_config({"space": "cpu", "strategy": "evolution", "objectives": ["bpb"],
                            "candidate_budget": {"kind": "steps", "amount": 40}})
        self.rng = random.Random(0)

    def add(self, parents=(), bpb=None, worker="node-1"):
        proposal = Proposal(get_space("cpu").sample(self.rng), tuple(parents),
                            "mutation" if parents else "random")
        candidate_id = self.db.record_proposal(proposal_record(proposal))
        self.db.record_start(candidate_id, worker)
        if bpb is not None:
            curve = [(step, 5.0 - step / 20) for step in range(1, 41, 10)]
            result = CandidateResult(Status.OK, val_loss=bpb * 0.7, val_bpb=bpb,
                                     params=self.rng.randrange(50_000, 900_000), steps=40,
                                     tokens=5_000, tokens_per_second=900.0, wall_seconds=4.0,
                                     loss_curve=curve)
            self.db.record_result(candidate_id, {**result.to_dict(), "worker": worker})
        return candidate_id


@pytest.fixture(scope="module")
def browser_window():
    """Tall enough for the whole page (the ``browser`` fixture is in conftest.py)."""
    return 1400, 1800


def _shot(browser, folder: Path, name: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    browser.save_screenshot(str(path))
    assert path.stat().st_size > 1000
    print(f"screenshot: {path}")
    return path


def test_the_dashboard_follows_a_run_and_opens_a_candidate(tmp_path, browser):
    artifacts = Path(os.environ.get("ARTIFACTS_DIR", "test-artifacts"))
    run = Run(tmp_path)
    first = run.add(bpb=2.4)
    second = run.add(bpb=2.1, worker="node-2")
    child = run.add(parents=[second], bpb=1.9)
    run.add(parents=[child], worker=MARKUP)  # still running
    promoted = tmp_path / "promoted"
    promoted.mkdir()
    (promoted / "report.md").write_text(f"# Promoted\n\n{MARKUP} held-out bpb 1.8\n")
    view = RunView(RunDatabase(tmp_path / "results.db", readonly=True), "browser-run",
                   promoted, f"chimera serve {promoted}")
    rows = (By.CSS_SELECTOR, "#leaderboard tbody tr")
    with make_dashboard_server(view, "127.0.0.1", 0) as httpd:
        browser.get(f"http://127.0.0.1:{httpd.server_address[1]}/")
        wait = WebDriverWait(browser, 30, poll_frequency=0.1)
        wait.until(lambda d: len(d.find_elements(*rows)) == 4)
        assert "best #" in browser.find_element(By.ID, "summary").text
        assert browser.find_elements(By.CSS_SELECTOR, "#pareto circle.front")
        assert browser.find_elements(By.CSS_SELECTOR, "#progress polyline")
        assert MARKUP in browser.find_element(By.ID, "workers").text  # shown as typed
        wait.until(lambda d: "held-out bpb" in d.find_element(By.ID, "promoted-report").text)
        assert MARKUP in browser.find_element(By.ID, "promoted-report").text
        _shot(browser, artifacts, "dashboard.png")

        # The search goes on: a new candidate finishes while the page is open.
        newest = run.add(parents=[child, first], bpb=1.7, worker="node-3")
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, f'tr[data-id="{newest}"]'))
        assert browser.find_element(By.CSS_SELECTOR, "#leaderboard tbody tr").get_attribute(
            "data-id") == str(newest)  # sorted by bpb, best first
        wait.until(lambda d: f"#{newest}" in d.find_element(By.ID, "lineage").text)
        browser.find_element(By.CSS_SELECTOR, '#leaderboard th[data-key="id"]').click()
        assert [r.get_attribute("data-id") for r in browser.find_elements(*rows)] == [
            str(i) for i in range(1, newest + 1)]
        Select(browser.find_element(By.ID, "status-filter")).select_by_value("running")
        assert [r.get_attribute("data-id") for r in browser.find_elements(*rows)] == [
            str(newest - 1)]
        Select(browser.find_element(By.ID, "status-filter")).select_by_value("")

        browser.find_element(By.CSS_SELECTOR, f'tr[data-id="{child}"]').click()
        wait.until(lambda d: d.find_element(By.ID, "detail-panel").is_displayed()
                   and f"candidate #{child}" in d.find_element(By.ID, "detail-title").text)
        assert f"#{second}" in browser.find_element(By.ID, "detail-parents").text
        assert browser.find_elements(By.CSS_SELECTOR, "#detail-loss polyline")
        assert "node-1" in browser.find_element(By.ID, "detail-timings").text
        _shot(browser, artifacts, "dashboard-candidate.png")
        assert not browser.find_elements(By.CSS_SELECTOR, "img")
        assert browser.title != "pwned"
    run.db.close()


def test_the_dashboard_of_a_real_search_grows_as_its_candidates_finish(tmp_path, browser):
    """A short in-process search runs in a thread; the open page gains its rows as they come."""
    import threading

    from rich.console import Console

    from cluster.app.evolve import EvolveSettings, run_evolve
    from cluster.cli.dashboard import open_view
    from search.evolution import EvolutionConfig
    from search.loop import SearchLimits
    from trainers.candidate import BudgetKind, TrainBudget, TrainHparams
    from trainers.corpus import CorpusSpec

    run_dir = tmp_path / "run"
    settings = EvolveSettings(
        run_dir=str(run_dir), corpus=CorpusSpec("stories", stories_bytes=60_000),
        tokenizer="char", in_process=True, warm_start=False,
        evolution=EvolutionConfig(population_size=3, tournament_size=2),
        limits=SearchLimits(max_candidates=5),
        candidate_budget=TrainBudget(BudgetKind.STEPS, 60),  # a few seconds each
        hparams=TrainHparams(batch_size=4, seq_len=32, eval_batches=2))
    search = threading.Thread(target=run_evolve, args=(settings, Console(quiet=True), False))
    search.start()
    try:
        wait = WebDriverWait(browser, 120, poll_frequency=0.1)
        wait.until(lambda _: (run_dir / "results.db").is_file()
                   and (run_dir / "run.json").is_file())
        with make_dashboard_server(open_view(str(run_dir)), "127.0.0.1", 0) as httpd:
            browser.get(f"http://127.0.0.1:{httpd.server_address[1]}/")
            seen = set()

            def rows(driver):
                count = len(driver.find_elements(By.CSS_SELECTOR, "#leaderboard tbody tr"))
                seen.add(count)
                return count == 5 and not search.is_alive()

            wait.until(rows)
            assert len(seen) >= 3, seen  # it grew while the page was open, not all at once
            browser.find_element(By.CSS_SELECTOR, "#leaderboard tbody tr").click()
            wait.until(lambda d: d.find_element(By.ID, "detail-panel").is_displayed())
    finally:
        search.join()
