"""Running untrusted generated code (HumanEval/MBPP pass@1): each program in its own subprocess, killed at a
timeout, with resource limits, no network, writing only inside a temporary folder that is removed afterwards.
A program that fails, hangs, crashes or breaks a rule scores 0; nothing it does stops the evaluation.

Two isolation modes; ``isolation()`` says which one this machine gets (probed once per process):

* ``namespaces`` (preferred; works as root in the container this was built in, and for ordinary users where
  unprivileged user namespaces are enabled): ``unshare`` gives the program its own user, network (loopback
  only, and down), mount and PID namespaces. Every mount is remounted read-only except the temporary folder,
  then a nested user+mount namespace locks those read-only flags (without it, root inside the first namespace
  could remount ``/`` read-write again). The program sees only its own processes, and dies with them when
  the sandbox is killed (``--kill-child``).
* ``audit-hook`` (fallback where ``unshare`` is missing or refused): a plain subprocess whose interpreter
  installs a ``sys.addaudithook`` guard before the program runs: socket creation/connection, subprocesses,
  ``fork``/``exec``, signals, ``ctypes`` and ``chdir`` raise ``PermissionError``, and so does opening for
  writing, creating, renaming or removing anything outside the temporary folder. An audit hook is not a
  security boundary against hostile code (CPython's documentation says so); it stops what model-generated
  code does by accident or naivety.

In both modes the guard is installed (defence in depth), and the interpreter sets RLIMIT_AS (memory), CPU,
NPROC, FSIZE, NOFILE and CORE=0 on itself before running the program. A program passes only when it runs to
the end and the runner prints a per-run nonce afterwards, so an early ``os._exit(0)`` does not count as a pass.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

MODES = ("namespaces", "audit-hook")


@dataclass(frozen=True)
class SandboxLimits:
    timeout: float = 3.0  # wall seconds of the program's run, as human-eval and bigcode's code_eval count them
    startup_timeout: float = 60.0  # interpreter and namespace start-up before the program (slow on a busy machine)
    memory_bytes: int = 1 << 30  # RLIMIT_AS
    file_size_bytes: int = 16 << 20  # RLIMIT_FSIZE: any one file, stdout/stderr files included
    processes: int = 16  # RLIMIT_NPROC, threads included
    open_files: int = 64  # RLIMIT_NOFILE
    output_chars: int = 4000  # kept of stdout/stderr in the result

    def __post_init__(self):
        for name in ("timeout", "startup_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"sandbox {name} must be > 0, got {getattr(self, name)}")
        for name in ("memory_bytes", "file_size_bytes", "processes", "open_files"):
            if getattr(self, name) < 1:
                raise ValueError(f"sandbox {name} must be >= 1, got {getattr(self, name)}")


@dataclass(frozen=True)
class RunResult:
    status: str  # passed | failed | timeout | killed
    returncode: int | None
    stdout: str
    stderr: str
    isolation: str

    @property
    def passed(self) -> bool:
        return self.status == "passed"


# The child's interpreter runs this with -I: limits, guard, then the program read from stdin. Line 1 of stdin is
# the JSON settings, the rest is the program.
_RUNNER = r'''
import json, os, resource, sys, threading
settings = json.loads(sys.stdin.readline())
source = sys.stdin.read()
work = os.path.realpath(os.getcwd())
for name, value in settings["rlimits"].items():
    soft_hard = (value, value)
    try:
        resource.setrlimit(getattr(resource, name), soft_hard)
    except (ValueError, OSError):
        resource.setrlimit(getattr(resource, name), (min(value, resource.getrlimit(getattr(resource, name))[1]),) * 2)
nonce, guarded, started = settings["nonce"], settings["guard"], settings["started_fd"]
del settings

BLOCKED = {"subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty",
           "os.kill", "os.killpg", "os.chdir", "os.chroot", "ctypes.dlopen", "ctypes.dlsym", "ctypes.cdata",
           "ctypes.call_function", "pty.spawn", "webbrowser.open", "urllib.Request", "http.client.connect",
           "ftplib.connect", "smtplib.connect", "poplib.connect", "imaplib.open", "telnetlib.Telnet.open"}
PATH_EVENTS = {"os.remove": (0,), "os.rmdir": (0,), "os.mkdir": (0,), "os.chmod": (0,), "os.chown": (0,),
               "os.chflags": (0,), "os.lchflags": (0,), "os.truncate": (0,), "os.utime": (0,),
               "os.rename": (0, 1), "os.link": (0, 1), "os.symlink": (1,), "os.mkfifo": (0,), "os.mknod": (0,),
               "os.setxattr": (0,), "os.removexattr": (0,), "shutil.rmtree": (0,), "shutil.move": (0, 1),
               "shutil.copyfile": (1,), "shutil.copytree": (1,), "shutil.chown": (0,)}
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
_state = threading.local()

def _inside(path):
    if isinstance(path, int):
        return True  # an already open descriptor
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    full = os.path.realpath(os.path.join(work, os.fspath(path)))
    return full == work or full.startswith(work + os.sep)

def _guard(event, args):
    if getattr(_state, "busy", False):
        return
    _state.busy = True
    try:
        if event in BLOCKED or event.startswith("socket."):
            raise PermissionError(f"sandbox: {event} is not allowed")
        if event == "open":
            path, mode, flags = (tuple(args) + (None, None, 0))[:3]
            writes = (mode is not None and any(c in str(mode) for c in "wax+")) or (mode is None and (flags or 0) & WRITE_FLAGS)
            if writes and not _inside(path):
                raise PermissionError(f"sandbox: writing {path!r} outside the working folder is not allowed")
        elif event in PATH_EVENTS:
            for i in PATH_EVENTS[event]:
                if i < len(args) and args[i] is not None and not _inside(args[i]):
                    raise PermissionError(f"sandbox: {event} on {args[i]!r} outside the working folder is not allowed")
    finally:
        _state.busy = False

if guarded:
    sys.addaudithook(_guard)
program = {"__name__": "__main__", "__builtins__": __builtins__}
os.write(started, b"s")  # the parent's clock for the program starts here
os.close(started)
try:
    exec(compile(source, "<candidate>", "exec"), program)
except BaseException:
    import traceback
    traceback.print_exc()
    sys.stderr.flush()
    os._exit(1)
sys.stdout.write("\n" + nonce + "\n")
sys.stdout.flush()
sys.stderr.flush()
os._exit(0)
'''

# Runs inside the outer namespaces as their root: keep the work folder writable, make every other mount
# read-only (except /proc, the PID namespace's own), then nest a user+mount namespace so those flags lock.
_NAMESPACE_SETUP = r'''
work="$1"; shift
mount --bind "$work" "$work" || exit 125
for mp in $(awk '{print $5}' /proc/self/mountinfo); do
  mp=$(printf '%b' "$mp")
  case "$mp" in "$work"|/proc|/proc/*) continue;; esac
  mount -o remount,bind,ro "$mp" 2>/dev/null
done
cd "$work" || exit 125
exec "$@"
'''

_mode_lock = threading.Lock()
_detected: str | None = None


def _settings(limits: SandboxLimits, mode: str, guard: bool, started_fd: int) -> dict:
    rlimits = {
        "RLIMIT_AS": int(limits.memory_bytes),
        "RLIMIT_CPU": int(math.ceil(limits.timeout)) + 2,  # + start-up
        "RLIMIT_FSIZE": int(limits.file_size_bytes),
        "RLIMIT_NOFILE": int(limits.open_files),
        "RLIMIT_CORE": 0,
    }
    # NPROC counts every task of the (real) uid. In its own user namespace the program's uid runs nothing else;
    # outside one, the limit is on top of what the uid already runs (root ignores it there).
    rlimits["RLIMIT_NPROC"] = int(limits.processes) + (0 if mode == "namespaces" else _tasks_of_uid())
    return {"rlimits": rlimits, "nonce": secrets.token_hex(16), "guard": guard, "started_fd": started_fd}


def _tasks_of_uid() -> int:
    uid, count = os.getuid(), 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = (entry / "status").read_text()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        if int(fields.get("Uid", "-1").split()[0]) == uid:
            count += int(fields.get("Threads", "1").strip() or 1)
    return count


def _command(mode: str, work: Path) -> list[str]:
    interpreter = [sys.executable, "-I", "-c", _RUNNER]
    if mode == "audit-hook":
        return interpreter
    unshare = shutil.which("unshare") or "/usr/bin/unshare"
    outer = [unshare, "--user", "--map-root-user", "--net", "--mount", "--pid", "--fork", "--kill-child",
             "--mount-proc"]
    nested = [unshare, "--user", "--map-root-user", "--mount"]
    return outer + ["/bin/sh", "-c", _NAMESPACE_SETUP, "sandbox", str(work)] + nested + interpreter


def _child_env(work: Path) -> dict[str, str]:
    return {"PATH": "/usr/bin:/bin", "HOME": str(work), "TMPDIR": str(work), "LANG": "C.UTF-8",
            "PYTHONDONTWRITEBYTECODE": "1", "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1"}


def _head(path: Path, limit: int) -> str:
    with open(path, "rb") as handle:
        return handle.read(limit * 4).decode("utf-8", errors="replace")[:limit]


def _ends_with(path: Path, marker: str) -> bool:
    with open(path, "rb") as handle:
        handle.seek(max(0, path.stat().st_size - len(marker) - 8))
        return handle.read().decode("utf-8", errors="replace").rstrip().endswith(marker)


def _execute(source: str, limits: SandboxLimits, mode: str, guard: bool) -> RunResult:
    root = Path(tempfile.mkdtemp(prefix="distmerge-sandbox-"))
    started_r, started_w = os.pipe()
    try:
        work = root / "work"
        work.mkdir()
        settings = _settings(limits, mode, guard, started_w)
        stdout_path, stderr_path = root / "stdout", root / "stderr"
        with open(stdout_path, "wb") as out, open(stderr_path, "wb") as err:
            proc = subprocess.Popen(_command(mode, work), stdin=subprocess.PIPE, stdout=out, stderr=err,
                                    cwd=str(work), env=_child_env(work), start_new_session=True,
                                    pass_fds=(started_w,))
            os.close(started_w)
            started_w = -1
            try:
                status = _supervise(proc, (json.dumps(settings) + "\n" + source).encode(), started_r, limits)
            finally:
                _kill_group(proc)
        nonce = settings["nonce"]
        stdout, stderr = _head(stdout_path, limits.output_chars + 64), _head(stderr_path, limits.output_chars)
        if status is None:
            if proc.returncode == 0 and _ends_with(stdout_path, nonce):
                status = "passed"
            elif proc.returncode is not None and proc.returncode < 0:
                status = "killed"  # a signal: memory, CPU or file-size limit, or a crash
            else:
                status = "failed"
        stdout = stdout.replace(nonce, "").rstrip()[: limits.output_chars]
        return RunResult(status, proc.returncode, stdout, stderr, mode)
    finally:
        for fd in (started_r, started_w):
            if fd >= 0:
                os.close(fd)
        shutil.rmtree(root, ignore_errors=True)


def _supervise(proc: subprocess.Popen, stdin: bytes, started_fd: int, limits: SandboxLimits) -> str | None:
    """Feed the program, wait for it to start, then give it ``limits.timeout`` seconds; "timeout" or None."""
    import select

    try:
        proc.stdin.write(stdin)
        proc.stdin.close()
    except BrokenPipeError:  # the child died before reading: its exit status tells why
        pass
    ready, _, _ = select.select([started_fd], [], [], limits.startup_timeout)
    if not ready:
        return "timeout" if proc.poll() is None else None
    try:
        proc.wait(timeout=limits.timeout)
    except subprocess.TimeoutExpired:
        return "timeout"
    return None


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass


# What namespace mode must give without the guard's help: no network, nothing writable beside the work folder
# (nor in /tmp), its own PID namespace, and no way back to a read-write root.
_PROBE = r'''
import os, socket, subprocess
try:
    socket.create_connection(("1.1.1.1", 53), timeout=2)
    raise SystemExit("network reachable")
except OSError:
    pass
for path in (os.path.join(os.path.dirname(os.getcwd()), "escape"), "/tmp/distmerge-sandbox-escape"):
    try:
        open(path, "w").close()
        raise SystemExit("wrote " + path)
    except OSError:
        pass
assert os.getpid() == 1 or os.getppid() <= 1, "not in its own PID namespace"
remount = subprocess.run(["mount", "-o", "remount,bind,rw", "/"], capture_output=True)
assert remount.returncode != 0, "could remount / read-write"
open("inside", "w").write("x")
'''


def _namespaces_work() -> bool:
    if not (shutil.which("unshare") or os.path.exists("/usr/bin/unshare")):
        return False
    try:
        return _execute(_PROBE, SandboxLimits(timeout=60), "namespaces", guard=False).passed
    except (OSError, subprocess.SubprocessError):
        return False


def isolation() -> str:
    """``namespaces`` or ``audit-hook``: what this process's sandboxes use (``DISTMERGE_SANDBOX`` forces one)."""
    global _detected
    forced = os.environ.get("DISTMERGE_SANDBOX")
    if forced:
        if forced not in MODES:
            raise ValueError(f"DISTMERGE_SANDBOX={forced!r}: one of {', '.join(MODES)}")
        return forced
    with _mode_lock:
        if _detected is None:
            _detected = "namespaces" if _namespaces_work() else "audit-hook"
        return _detected


def run_program(source: str, limits: SandboxLimits | None = None, mode: str | None = None,
                guard: bool = True) -> RunResult:
    """Run ``source`` (a whole Python program: solution + tests) in a fresh sandbox.

    ``guard=False`` leaves out the audit-hook guard, so tests can check the OS-level barriers of namespace mode.
    """
    mode = mode or isolation()
    if mode not in MODES:
        raise ValueError(f"sandbox mode {mode!r}: one of {', '.join(MODES)}")
    return _execute(source, limits or SandboxLimits(), mode, guard)

