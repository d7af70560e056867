"""The token store on every node, once.

All workers of a search read the same token store. Where the driver's store directory is
readable (one machine, or a run directory on a shared filesystem) workers memory-map it where it
is. Otherwise the driver puts the store's files into Ray's object store once (``ship_store``);
the first worker to start on a node writes them to a node-local directory under a file lock, and
every later worker on that node finds the copy and memory-maps it. So the store crosses the
network once per node, not once per actor, and the page cache holds one copy per node however
many workers read it.

Copies live under ``<cache root>/node-<node id>/<store key>`` (the key hashes the store's
``meta.json``, which records every file's checksum), so a later run on the same data reuses them.
"""

from __future__ import annotations

import enum
import fcntl
import hashlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from trainers.store import META_FILE, TokenStore

DEFAULT_CACHE_ROOT = str(Path(os.environ.get("TMPDIR", "/tmp")) / "chimera-stores")


class StoreTransfer(str, enum.Enum):
    AUTO = "auto"  # use the driver's directory where a node can read it, else copy
    COPY = "copy"  # always a node-local copy (e.g. a slow network filesystem)


class Origin(str, enum.Enum):
    SHARED = "shared"  # the driver's directory, read in place
    COPIED = "copied"  # this worker wrote the node's copy
    NODE_CACHE = "node-cache"  # another worker (or an earlier run) had written it


@dataclass(frozen=True)
class StoreSource:
    """Where workers find the store: the driver's path, and its files in the object store."""

    path: str
    key: str
    transfer: StoreTransfer = StoreTransfer.AUTO
    files: object = None  # ray.ObjectRef of {relative path: uint8 array}; None: path only
    cache_root: str = DEFAULT_CACHE_ROOT


def store_key(root: str | Path) -> str:
    return hashlib.sha256((Path(root) / META_FILE).read_bytes()).hexdigest()[:16]


def ship_store(root: str | Path, transfer: StoreTransfer = StoreTransfer.AUTO,
               cache_root: str = DEFAULT_CACHE_ROOT, ship: bool = True) -> StoreSource:
    """Describe the store at ``root`` for workers; with ``ship`` its files go into the object
    store once (as arrays, so each node's workers read them zero-copy from shared memory)."""
    root = Path(root).resolve()
    files = None
    if ship:
        import ray

        files = ray.put({str(path.relative_to(root)): np.fromfile(path, dtype=np.uint8)
                         for path in sorted(root.rglob("*")) if path.is_file()})
    return StoreSource(str(root), store_key(root), transfer, files, cache_root)


def _readable_here(source: StoreSource) -> bool:
    meta = Path(source.path) / META_FILE
    return meta.is_file() and store_key(source.path) == source.key


def open_on_node(source: StoreSource, node_id: str) -> tuple[TokenStore, Origin, Path]:
    """Open the store on this node: in place, from the node's copy, or by writing that copy."""
    if source.transfer is StoreTransfer.AUTO and _readable_here(source):
        # The driver verified the checksums; workers only check the layout.
        return TokenStore.open(source.path, verify=False), Origin.SHARED, Path(source.path)
    if source.files is None:
        raise FileNotFoundError(f"{source.path}: the token store is not readable on node "
                                f"{node_id[:12]} and was not shipped through the object store")
    node_dir = Path(source.cache_root) / f"node-{node_id[:12]}"
    node_dir.mkdir(parents=True, exist_ok=True)
    target = node_dir / source.key
    with open(node_dir / f"{source.key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one writer per node; the others wait, then map it
        origin = Origin.NODE_CACHE
        if not (target / META_FILE).is_file():
            _write_copy(source, target)
            origin = Origin.COPIED
    return TokenStore.open(target, verify=origin is Origin.COPIED), origin, target


def _write_copy(source: StoreSource, target: Path) -> None:
    import ray

    files = ray.get(source.files)
    staging = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    for relative, data in files.items():
        path = staging / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        data.tofile(path)
    shutil.rmtree(target, ignore_errors=True)  # a copy without meta.json is incomplete
    os.replace(staging, target)  # complete or absent, never half-written
