"""Injected faults, for tests of the engine's recovery paths only.

``DISTMERGE_FAULT_INJECT`` holds comma-separated ``key=value`` items, read by the driver and shipped to the
workers in their spec:

* ``worker_exit_after_groups=N@W``: worker W's first incarnation exits the process after merging N groups;
* ``driver_exit_after_shards=N``: the driver exits (os._exit, no cleanup) after N shards are recorded;
* ``enospc_on_shard=I``: writing shard I fails with "No space left on device";
* ``eio_on_tensor=NAME``: reading tensor NAME fails with an I/O error (every model, every incarnation);
* ``adamerging_exit_after_steps=K[@V]``: an AdaMerging run's rank 0 exits after step K of variant V, once;
* ``adamerging_driver_exit_at_step=K``: the AdaMerging driver exits (os._exit, no cleanup) once a checkpoint of
  step K or later is on disk, while its Train job waits at step K (so nothing after it reaches the disk).

The faults are real process exits and real OSErrors raised where the system would raise them, so the code
under test is the production path.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable

ENV = "DISTMERGE_FAULT_INJECT"


def parse(text: str | None = None) -> dict[str, str]:
    text = os.environ.get(ENV, "") if text is None else text
    items = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, _, value = item.partition("=")
        items[key.strip()] = value.strip()
    return items


def worker_exit_after(faults: dict[str, str], worker: int, incarnation: int) -> int | None:
    spec = faults.get("worker_exit_after_groups")
    if not spec or incarnation != 0:
        return None
    count, _, target = spec.partition("@")
    return int(count) if int(target or 0) == worker else None


def check_write(faults: dict[str, str], shard_index: int, path) -> None:
    if faults.get("enospc_on_shard") not in (None, "") and int(faults["enospc_on_shard"]) == shard_index:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


def check_read(faults: dict[str, str], tensor: str, path) -> None:
    if faults.get("eio_on_tensor") == tensor:
        raise OSError(errno.EIO, os.strerror(errno.EIO), str(path))


def driver_exit_after(faults: dict[str, str]) -> int | None:
    value = faults.get("driver_exit_after_shards")
    return int(value) if value else None


def watch_adamerging_driver_exit(faults: dict[str, str], latest_step: Callable[[], int]) -> None:
    """``adamerging_driver_exit_at_step``: a daemon thread that ends this process once ``latest_step()`` (the step
    of the newest complete checkpoint on disk) reaches K: the driver dies as a killed one does."""
    value = faults.get("adamerging_driver_exit_at_step")
    if not value:
        return
    import threading
    import time

    def watch() -> None:
        while latest_step() < int(value):
            time.sleep(0.02)
        os._exit(3)

    threading.Thread(target=watch, daemon=True, name="distmerge-fault-driver-exit").start()
