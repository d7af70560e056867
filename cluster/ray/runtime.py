"""Connecting to Ray: an embedded local cluster sized to this machine, or an existing one."""

from __future__ import annotations

import logging
import os


def start_ray(address: str | None = None) -> bool:
    """Connect to Ray (an embedded local one unless an address is given). True if this call
    started it, so the caller shuts it down again."""
    import ray

    if ray.is_initialized():
        return False
    if address:
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
    else:
        # Reachable from this machine only as far as Ray allows: no dashboard, and Ray's token
        # authentication (on by default in current Ray; never turned off here) guards its gRPC
        # ports. Ray cannot bind them to loopback: its servers listen on every interface, and
        # it turns a loopback node address (_node_ip_address="127.0.0.1") into the machine's
        # own, so a firewall is the way to close them on a shared network.
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False,
                 logging_level=logging.WARNING, log_to_driver=False)
    return True
