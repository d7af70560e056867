"""`start_ray`: which cluster a command without --address ends up on."""

import os
import shutil
import tempfile

import pytest

from cluster.ray.runtime import start_ray


@pytest.fixture
def ray_temp(monkeypatch):
    """A Ray temp directory of this test's own (short: Ray's socket paths must stay short)."""
    temp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    monkeypatch.setenv("RAY_TMPDIR", temp)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    yield temp
    shutil.rmtree(temp, ignore_errors=True)


def test_a_stale_current_cluster_file_does_not_stop_the_embedded_cluster(ray_temp):
    """`ray start` leaves its address in ray_current_cluster, and a cluster that died without
    `ray stop` leaves it behind: plain ray.init would try to join it and refuse num_cpus."""
    import ray

    os.makedirs(os.path.join(ray_temp, "ray"))
    with open(os.path.join(ray_temp, "ray", "ray_current_cluster"), "w") as f:
        f.write("127.0.0.1:1")  # nothing listens there
    assert start_ray() is True
    try:
        assert ray.cluster_resources()["CPU"] == os.cpu_count()
        assert start_ray() is False  # already connected: the caller that started it stops it
    finally:
        ray.shutdown()
