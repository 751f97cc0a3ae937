"""Stops an embedded Ray's processes when its driver dies without stopping them (SIGKILL, OOM kill).

Run as a script (``python ray_watchdog.py DRIVER_PID``, stdin a pipe from the driver) so that it starts without
importing distmerge, torch or Ray: it only needs psutil. The driver writes ``bye`` and closes the pipe when it
has stopped Ray itself; end of file without it means the driver died, and the watchdog then kills every process
it saw descend from the driver. Each is identified by pid and start time (psutil checks both), so a pid the
kernel has since reused is never hit.

Why (Ray 2.60, measured): the GCS, raylet, dashboard and workers die within about 2 s of the driver, but the
raylet's DashboardAgent and RuntimeEnvAgent, which notice the raylet's death at once, then block for Ray's fixed
60 s trying to report it to the GCS that died with it; no Ray setting shortens that.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading

import psutil

GOODBYE = b"bye"


def watch(driver_pid: int, poll_s: float = 1.0) -> None:
    driver = psutil.Process(driver_pid)
    seen: dict[tuple[int, float], psutil.Process] = {}
    verdict: list[bytes] = []
    reader = threading.Thread(target=lambda: verdict.append(sys.stdin.buffer.readline()), daemon=True)
    reader.start()
    me = os.getpid()
    while reader.is_alive():
        try:
            for proc in driver.children(recursive=True):
                if proc.pid != me:
                    seen.setdefault((proc.pid, proc.create_time()), proc)
        except psutil.Error:
            pass  # the driver is gone; the pipe says whether it said goodbye
        reader.join(poll_s)
    if verdict and verdict[0].strip() == GOODBYE:
        return
    kill_all(list(seen.values()))


def kill_all(processes: list, grace_s: float = 3.0) -> None:
    """SIGTERM, then SIGKILL what is still running after the grace period."""
    alive = [proc for proc in processes if proc.is_running()]
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.terminate()
    _, alive = psutil.wait_procs(alive, timeout=grace_s)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()


if __name__ == "__main__":
    watch(int(sys.argv[1]))
