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
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False,
                 logging_level=logging.WARNING, log_to_driver=False)
    return True
