"""Connecting to Ray: an embedded local cluster sized to this machine, or an existing one."""

from __future__ import annotations

import logging
import os


def start_ray(address: str | None = None) -> bool:
    """Connect to Ray: ``address``, else the cluster a Ray job runs on (``RAY_ADDRESS``), else an
    embedded local one. True if this call started it, so the caller shuts it down again."""
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
    else:
        # Reachable from this machine only as far as Ray allows: no dashboard, and Ray's token
        # authentication (on by default in current Ray; never turned off here) guards its gRPC
        # ports. Ray cannot bind them to loopback: its servers listen on every interface, and
        # it turns a loopback node address (_node_ip_address="127.0.0.1") into the machine's
        # own, so a firewall is the way to close them on a shared network.
        # address="local": Ray would otherwise join whatever /tmp/ray/ray_current_cluster names
        # (a cluster started by `ray start`, or one long dead) and then refuse num_cpus.
        ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False,
                 logging_level=logging.WARNING, log_to_driver=False)
    return True
