"""The code sandbox against hostile programs: each attack is written so that the tests would pass if it worked,
so "contained" means scored 0 (and no trace of it outside). Controls show the same shapes pass when honest."""

from __future__ import annotations

import json
import os
import socket
import tempfile
import threading
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from distmerge.evaluate import sandbox
from distmerge.evaluate.tasks import get_task

FAST = sandbox.SandboxLimits(timeout=10.0)
UNSANDBOXED = sandbox.SandboxLimits(timeout=10.0, allow_unsandboxed=True)
SECRET = "distmerge-test-secret-7f3a9c"


def _namespaces_or_skip():
    reason = sandbox.namespaces_refused()
    if reason is not None:
        pytest.skip(f"the kernel refuses the sandbox's namespaces here: {reason}")


@pytest.fixture(params=["namespaces", "audit-hook"])
def mode(request):
    if request.param == "namespaces":
        _namespaces_or_skip()
    return request.param


def run(candidate: str, tests: str, mode: str, guard: bool = True, **kwargs) -> sandbox.RunResult:
    limits = kwargs.pop("limits", FAST if mode == "namespaces" else UNSANDBOXED)
    return sandbox.run_program(candidate, tests, limits, mode=mode, guard=guard, **kwargs)


def _processes_with(marker: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if marker.encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


# --- honest programs ----------------------------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_correct_programs_pass_and_wrong_ones_fail(mode):
    passing = run("def f(x):\n    return x + 1\nprint('ok')\n", "assert f(1) == 2\n", mode)
    assert passing.passed and passing.stdout == "ok" and passing.isolation == mode
    failing = run("def f(x):\n    return x\n", "assert f(1) == 2\n", mode)
    assert failing.status == "failed" and failing.stderr.splitlines()[-1] == "AssertionError"
    syntax = run("def f(:\n", "assert f(1) == 2\n", mode)
    assert syntax.status == "failed" and "SyntaxError" in syntax.stderr.splitlines()[-1]
    # What crosses between the two processes: data both ways, the candidate's classes and generators as handles,
    # its exceptions as the builtin ones.
    rich = run("class Pair:\n    def __init__(self, a, b):\n        self.a, self.b = a, b\n"
               "def chain(pairs, n):\n    return sum(p.b - p.a for p in pairs[:n])\n"
               "def evens(n):\n    yield from range(0, n, 2)\n"
               "def stats(xs):\n    return {'n': len(xs), 'set': set(xs), 't': (min(xs), 1.5), 'b': b'x'}\n"
               "def check(x):\n    if x < 0:\n        raise ValueError('negative')\n    return x\n",
               "assert chain([Pair(1, 5), Pair(2, 3)], 2) == 5\nassert list(evens(5)) == [0, 2, 4]\n"
               "assert stats([3, 1, 3]) == {'n': 3, 'set': {1, 3}, 't': (1, 1.5), 'b': b'x'}\n"
               "try:\n    check(-1)\n    raise AssertionError('no error')\nexcept ValueError as e:\n"
               "    assert str(e) == 'negative'\n", mode)
    assert rich.passed, rich.stderr


@pytest.mark.timeout(60)
def test_timeouts_and_crashes_score_zero(mode):
    limits = sandbox.SandboxLimits(timeout=1.5, allow_unsandboxed=True)
    hang = run("while True:\n    pass\n", "", mode, limits=limits)
    assert hang.status == "timeout" and not hang.passed
    hang_in_call = run("def f():\n    while True:\n        pass\n", "f()\n", mode, limits=limits)
    assert hang_in_call.status == "timeout"
    crash = run("import os\ndef f():\n    os.abort()\n", "f()\n", mode)
    assert crash.status == "killed"
    memory = run("x = bytearray(2 * 1024 ** 3)\n", "", mode)
    assert not memory.passed and "MemoryError" in memory.stderr
    big_file = run("open('big', 'wb').write(b'x' * (32 << 20))\n", "", mode)
    assert not big_file.passed  # RLIMIT_FSIZE (16 MiB)
    flood = run("import sys\nsys.stdout.write('x' * (32 << 20))\nsys.stdout.flush()\n", "", mode)
    assert not flood.passed and len(flood.stdout) <= FAST.output_chars


@pytest.mark.timeout(60)
def test_each_run_removes_its_folders(mode, tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    result = run("open('left.txt', 'w').write('x')\ndef f():\n    return open('left.txt').read()\n",
                 "assert f() == 'x'\n", mode)
    assert result.passed and list(tmp_path.iterdir()) == []


@pytest.mark.timeout(60)
def test_humaneval_helpers_are_the_datasets_not_the_completions(mode):
    # HumanEval/32 checks find_zero with the prompt's poly(); a completion that redefines poly to return 0 must not
    # pass on the strength of its own helper.
    prompt = ("def poly(xs, x):\n    return sum(c * x ** i for i, c in enumerate(xs))\n\n"
              "def find_zero(xs):\n    \"\"\"A zero of the polynomial.\"\"\"\n")
    tests = "def check(candidate):\n    assert abs(poly([1, 2], candidate([1, 2]))) < 1e-6\n\ncheck(find_zero)\n"
    honest = run(prompt + "    return -xs[0] / xs[1]\n", tests, mode, setup=prompt, entry_points=("find_zero",))
    assert honest.passed, honest.stderr
    cheat = run(prompt + "    return 123.0\n\ndef poly(xs, x):\n    return 0\n", tests, mode, setup=prompt,
                entry_points=("find_zero",))
    assert cheat.status == "failed"


# --- forging the verdict ------------------------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_a_candidate_cannot_forge_the_verdict(mode):
    wrong = "def f(x):\n    return x\n"  # every case below is wrong on the tests: only a forgery could pass it
    tests = "assert f(1) == 2\n"
    forgeries = {
        # print and write whatever a harness might read as success, on every descriptor it holds
        "print": wrong + "import os\nprint('\\npass\\n' * 3)\nfor fd in range(64):\n    try:\n"
                 "        os.write(fd, b'pass\\n{\"ok\": 2}\\n')\n    except OSError:\n        pass\n",
        "exit 0 early": wrong + "import os\nos._exit(0)\n",
        "sys.exit 0": wrong + "import sys\nsys.exit(0)\n",
        "exit 0 in the call": "import os\ndef f(x):\n    os._exit(0)\n",
        "SystemExit in the call": "def f(x):\n    raise SystemExit(0)\n",
        "always equal": "class Same:\n    def __eq__(self, other):\n        return True\n"
                        "    __hash__ = object.__hash__\ndef f(x):\n    return Same()\n",
        "patched builtins": wrong + "import builtins\nbuiltins.AssertionError = None\n"
                            "builtins.abs = lambda x: 0\n",
    }
    for name, candidate in forgeries.items():
        result = run(candidate, tests, mode)
        assert not result.passed and result.status in ("failed", "killed"), (name, result)


# --- reaching the evaluator ---------------------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_guard_state_and_raw_process_calls_do_not_escape(mode, tmp_path):
    marker = tmp_path / "pwned"
    # The old guard kept its state in the harness's module: switch it off there, then run a shell.
    switch_off = ("import os, sys\nmain = sys.modules['__main__']\n"
                  "for value in list(vars(main).values()):\n"
                  "    for attr in ('busy', 'guarded'):\n        try:\n            setattr(value, attr, True)\n"
                  "        except Exception:\n            pass\n"
                  "    if isinstance(value, (set, dict)) and value is not vars(main):\n"
                  "        try:\n            value.clear()\n        except Exception:\n            pass\n")
    attacks = _process_attacks(marker)
    attacks["switch the guard off, then os.system"] = switch_off + attacks["os.system"]
    for name, candidate in attacks.items():
        assert not run(candidate, "assert f() == 0\n", mode).passed, name
        time.sleep(0.2)
        assert not marker.exists(), name


def _process_attacks(marker: Path) -> dict[str, str]:
    write_marker = f"open({str(marker)!r}, 'w').write('x')"
    return {
        "os.system": f"import os\ndef f():\n    return os.system({f'echo x > {marker}'!r})\n",
        "_posixsubprocess.fork_exec": (
            "import os, sys\ndef f():\n    import _posixsubprocess\n"
            f"    args = [sys.executable, '-c', {write_marker!r}]\n"
            "    common = [args, [os.fsencode(sys.executable)], True, (), None, None, -1, -1, -1, -1, -1, -1,\n"
            "              *os.pipe(), False, False, -1, None, None, None, -1, None]\n"
            "    try:  # the signature changes between Python versions\n"
            "        pid = _posixsubprocess.fork_exec(*common, False)\n"
            "    except TypeError:\n"
            "        pid = _posixsubprocess.fork_exec(*common)\n"
            "    return os.waitpid(pid, 0)[1]\n"),
    }


def test_the_attacks_work_where_nothing_stops_them(tmp_path):
    """Each attack above is real: unsandboxed and unguarded, it does what it says (so its refusal is the wall's)."""
    marker = tmp_path / "pwned"
    for name, candidate in _process_attacks(marker).items():
        assert run(candidate, "assert f() == 0\n", "audit-hook", guard=False).passed, name
        assert marker.exists(), name
        marker.unlink()
    dir_fd = run(_dir_fd_write(tmp_path), "assert f() == 1\n", "audit-hook", guard=False)
    assert dir_fd.passed and (tmp_path / "escaped").exists()
    token = tmp_path / "auth_token"
    token.write_text(SECRET)
    read = run(f"def f():\n    return open({str(token)!r}).read()\n", f"assert f() == {SECRET!r}\n", "audit-hook")
    assert read.passed  # reads are what only the namespaces' view stops


def _dir_fd_write(folder: Path) -> str:
    return ("import os\ndef f():\n"
            f"    d = os.open({str(folder)!r}, os.O_RDONLY)\n"
            "    fd = os.open('escaped', os.O_WRONLY | os.O_CREAT, dir_fd=d)\n    return os.write(fd, b'x')\n")


@pytest.mark.timeout(60)
def test_writes_stay_inside(mode, tmp_path):
    target = tmp_path / "escaped"
    plain = f"def f():\n    open({str(target)!r}, 'w').write('x')\n    return 1\n"
    dir_fd = _dir_fd_write(tmp_path)
    remove = f"import shutil\ndef f():\n    shutil.rmtree({str(tmp_path)!r})\n    return 1\n"
    for name, candidate in (("open", plain), ("dir_fd", dir_fd), ("rmtree", remove)):
        assert not run(candidate, "assert f() == 1\n", mode).passed, name
    assert tmp_path.is_dir() and not target.exists()
    inside = run("import os\nos.mkdir('d')\nopen('d/a.txt', 'w').write('y')\n"
                 "def f():\n    return open('d/a.txt').read()\n", "assert f() == 'y'\n", mode)
    assert inside.passed, inside.stderr


@pytest.mark.timeout(60)
def test_no_network(mode):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    accepted = []
    threading.Thread(target=lambda: accepted.append(server.accept()), daemon=True).start()
    try:
        connect = ("def f():\n    import socket\n"
                   f"    socket.create_connection(('127.0.0.1', {port}), timeout=2)\n    return 'connected'\n")
        assert not run(connect, "assert f() == 'connected'\n", mode).passed
        if mode == "namespaces":  # the network namespace alone, without the guard
            assert not run(connect, "assert f() == 'connected'\n", mode, guard=False).passed
        time.sleep(0.2)
        assert not accepted
    finally:
        server.close()


@pytest.mark.timeout(60)
def test_the_evaluators_files_and_processes_are_out_of_sight(tmp_path, monkeypatch):
    _namespaces_or_skip()
    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    token = home / ".ray" / "auth_token"
    token.write_text(SECRET)
    token.chmod(0o644)  # world-readable, as Ray writes it: only the sandbox's view keeps it out of reach
    monkeypatch.setenv("DISTMERGE_TEST_SECRET", SECRET)  # in the evaluator's environment
    reads = {
        "auth token": f"def f():\n    return open({str(token)!r}).read()\n",
        "/etc/shadow": "def f():\n    return open('/etc/shadow').read()\n",
        "environ": "import os\ndef f():\n    seen = ''\n    for pid in os.listdir('/proc'):\n        try:\n"
                   "            seen += open(f'/proc/{pid}/environ').read()\n        except OSError:\n"
                   "            pass\n    return seen + os.environ.get('DISTMERGE_TEST_SECRET', '')\n",
        "home listing": "import os\ndef f():\n    return ' '.join(os.listdir(os.path.expanduser('~')) + "
                        f"os.listdir({str(home.parent)!r}))\n",
    }
    for guard in (True, False):
        for name, candidate in reads.items():
            tests = ("assert 'root:' in f()\n" if name == "/etc/shadow" else
                     "assert '.ray' in f()\n" if name == "home listing" else f"assert {SECRET!r} in f()\n")
            result = run(candidate, tests, "namespaces", guard=guard)
            assert not result.passed and SECRET not in result.stdout + result.stderr, (name, guard, result)
    view = run("import os\ndef f():\n    return sorted(os.listdir('/')), sorted(os.listdir('/proc'))[-3:]\n",
               "print(f())\n", "namespaces")
    top, _ = eval(view.stdout.splitlines()[-1])
    assert view.passed and not {"etc", "home", "tmp", "var", "run"} & set(top), top


@pytest.mark.timeout(120)
def test_processes_are_bounded_and_die_with_the_run():
    _namespaces_or_skip()
    # Without the guard (which refuses fork), so the kernel's limits are what is tested. At most 200 tries: if
    # the bound failed, the machine still holds.
    bomb = ("import os, time\nn = 0\ntry:\n    while n < 200:\n        if os.fork() == 0:\n"
            "            time.sleep(30)\n            os._exit(0)\n        n += 1\nexcept OSError:\n    pass\n"
            "def f():\n    return n\n")
    bounded = run(bomb, "assert f() >= 100, f()\n", "namespaces", guard=False)
    assert bounded.status == "failed" and "AssertionError" in bounded.stderr, bounded
    counted = run(bomb, "print(f())\n", "namespaces", guard=False)
    assert counted.passed and int(counted.stdout.splitlines()[-1]) < FAST.processes
    marker = f"distmerge-sandbox-orphan-{os.getpid()}"
    orphan = ("import os, sys, time\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n"
              f"        os.execv(sys.executable, [sys.executable, '-c', 'import time; time.sleep(60)', {marker!r}])\n"
              "    os._exit(0)\ntime.sleep(0.5)\ndef f():\n    return 1\n")
    assert run(orphan, "assert f() == 1\n", "namespaces", guard=False).passed
    time.sleep(0.5)
    assert _processes_with(marker) == []


@pytest.mark.timeout(60)
def test_no_new_namespaces_and_no_tracing():
    """The seccomp filter: as root, bwrap alone would let the program make a user namespace of its own."""
    _namespaces_or_skip()
    calls = {"a user namespace": "libc.unshare(0x10000000)", "a mount namespace": "libc.unshare(0x20000)",
             "ptrace": "libc.ptrace(16, 1, 0, 0)"}  # PTRACE_ATTACH to the sandbox's init
    for name, call in calls.items():
        program = f"import ctypes\ndef f():\n    libc = ctypes.CDLL(None, use_errno=True)\n    return {call}\n"
        result = run(program, "assert f() == 0\n", "namespaces", guard=False)
        assert result.status == "failed" and "AssertionError" in result.stderr, (name, result)
    threads_and_forks = ("import os, threading\ndef f():\n    seen = []\n"
                         "    t = threading.Thread(target=lambda: seen.append(1))\n    t.start()\n    t.join()\n"
                         "    pid = os.fork()\n    if pid == 0:\n        os._exit(7)\n"
                         "    return seen + [os.waitpid(pid, 0)[1] >> 8]\n")
    assert run(threads_and_forks, "assert f() == [1, 7]\n", "namespaces", guard=False).passed


def test_seccomp_filter_covers_the_common_architectures():
    for machine in ("x86_64", "aarch64"):
        program = sandbox.seccomp_filter(machine)
        assert program and len(program) % 8 == 0 and len(program) // 8 < 256  # 8-byte instructions, short jumps
    assert sandbox.seccomp_filter("riscv64") is None


def test_the_orphan_check_sees_a_survivor():
    """The check above is not vacuous: unsandboxed, the same setsid grandchild outlives its run."""
    marker = f"distmerge-sandbox-orphan-control-{os.getpid()}"
    orphan = ("import os, sys, time\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n"
              f"        os.execv(sys.executable, [sys.executable, '-c', 'import time; time.sleep(20)', {marker!r}])\n"
              "    os._exit(0)\ntime.sleep(0.5)\ndef f():\n    return 1\n")
    run(orphan, "assert f() == 1\n", "audit-hook", guard=False)
    survivors = _processes_with(marker)
    try:
        assert survivors
    finally:
        for pid in survivors:
            os.kill(pid, 9)


# --- where namespaces are refused ---------------------------------------------------------------------------

def test_refused_namespaces_refuse_to_run_code_unless_asked(monkeypatch):
    monkeypatch.setattr(sandbox, "_probed", [])
    monkeypatch.setenv("DISTMERGE_BWRAP", "/bin/false")  # a bwrap that never starts a sandbox
    assert sandbox.namespaces_refused() is not None
    with pytest.raises(sandbox.SandboxUnavailable, match="--allow-unsandboxed-code"):
        sandbox.isolation()
    with pytest.raises(sandbox.SandboxUnavailable, match="--allow-unsandboxed-code"):
        sandbox.run_program("def f():\n    return 1\n", "assert f() == 1\n", FAST)
    with pytest.raises(sandbox.SandboxUnavailable, match="no security boundary"):
        sandbox.run_program("x = 1\n", "", FAST, mode="audit-hook")
    assert sandbox.isolation(allow_unsandboxed=True) == "audit-hook"
    allowed = sandbox.run_program("def f():\n    return 1\n", "assert f() == 1\n", UNSANDBOXED)
    assert allowed.passed and allowed.isolation == "audit-hook"
    # The task's scorer asks the same question: a refused sandbox is an error, not a row scored 0.
    row = {**get_task("mbpp").prepare({"text": "one", "test_list": ["assert f() == 1"]}), "entry": ""}
    with pytest.raises(sandbox.SandboxUnavailable):
        get_task("mbpp").score("```python\ndef f():\n    return 1\n```", float("nan"), row, sandbox=FAST)


def test_a_bwrap_that_skips_the_namespaces_is_refused(tmp_path, monkeypatch):
    fake = tmp_path / "bwrap"
    fake.write_text('#!/bin/sh\nwhile [ "$1" != "--" ]; do shift; done\nshift\nexec "$@"\n')
    fake.chmod(0o755)
    monkeypatch.setattr(sandbox, "_probed", [])
    monkeypatch.setenv("DISTMERGE_BWRAP", str(fake))
    assert sandbox.namespaces_refused() is not None


@pytest.mark.timeout(120)
def test_eval_refuses_generated_code_where_namespaces_are_refused(llama_family, tmp_path, monkeypatch):
    from distmerge.cli import app

    base, _ = llama_family
    data = tmp_path / "mbpp.jsonl"
    data.write_text(json.dumps({"text": "one", "test_list": ["assert f() == 1"], "task_id": 1}) + "\n")
    monkeypatch.setattr(sandbox, "_probed", [])
    monkeypatch.setenv("DISTMERGE_BWRAP", "/bin/false")
    result = CliRunner().invoke(app, ["eval", str(base), "--task", "mbpp", "--data", str(data)])
    assert result.exit_code == 2, result.output
    message = " ".join(result.output.split())
    assert "generated code is not run" in message and "--allow-unsandboxed-code" in message
    assert "Traceback" not in result.output


def test_the_opt_in_runs_with_a_warning(monkeypatch, capsys):
    from distmerge.evaluate import cli

    monkeypatch.setattr(sandbox, "_probed", ["no user namespaces here"])
    with pytest.raises(sandbox.SandboxUnavailable):
        cli._check_sandbox(False)
    cli._check_sandbox(True)
    assert "only an audit hook" in capsys.readouterr().err


def test_settings_are_validated():
    with pytest.raises(ValueError, match="timeout"):
        sandbox.SandboxLimits(timeout=0)
    with pytest.raises(ValueError, match="mode"):
        sandbox.run_program("pass", "", FAST, mode="chroot")
