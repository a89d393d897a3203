"""Code benchmarks: the program a model's answer becomes, and running it safely.

pass@1 is "the assembled program exits with status 0": the model's code followed by the benchmark's
tests (HumanEval: ``check(entry_point)``; MBPP: its ``assert`` lines). Each program runs in a fresh
subprocess under these limits:

- ``python -I`` (isolated mode: no user site, no ``PYTHON*`` variables) with an environment of only
  ``PATH``, ``LANG``, ``HOME`` and ``TMPDIR``, so no proxy settings or tokens are inherited;
- the working directory is a new temporary directory, removed afterwards;
- ``setrlimit`` as the first thing the child interpreter does: address space (``memory_mb``), CPU
  seconds, a 16 MiB file-size cap, no core dumps;
- no network, two layers: the child enters a new user + network namespace where the kernel allows it
  (only a down loopback exists there, so nothing is reachable, from any language), and a bootstrap
  replaces Python's socket constructors with one that raises before the program runs;
- a wall-time limit: on timeout the whole process group is killed (SIGKILL), and any process the
  program left behind is killed when it ends.

This is a test harness for model-written code, not a security boundary against a determined attacker:
where user namespaces are disabled, a program can still reach the network through a child process.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

_CLONE_NEWUSER = 0x10000000
_CLONE_NEWNET = 0x40000000

# The first code the child interpreter runs, while it is still single-threaded (which a new user
# namespace requires): the limits, the namespace, the socket block, then the program as __main__.
# Doing this here rather than in a ``preexec_fn`` keeps Python code out of the window between fork and
# exec, which is unsafe in multi-threaded parents such as Ray workers.
# argv: memory_mb, cpu_seconds, net_namespace (0/1), block_sockets (0/1), program path.
_BOOTSTRAP = """\
import ctypes as _ctypes, resource as _resource, runpy as _runpy, sys as _sys
_mem, _cpu, _netns, _block, _path = _sys.argv[1:6]
_mem = int(_mem) * 1024 * 1024
_resource.setrlimit(_resource.RLIMIT_AS, (_mem, _mem))
_resource.setrlimit(_resource.RLIMIT_CPU, (int(_cpu), int(_cpu) + 1))
_resource.setrlimit(_resource.RLIMIT_FSIZE, (16 << 20, 16 << 20))
_resource.setrlimit(_resource.RLIMIT_CORE, (0, 0))
if _netns == "1":
    # Fails quietly where user namespaces are disabled; the socket block below still applies.
    _ctypes.CDLL(None, use_errno=True).unshare(%d | %d)
if _block == "1":
    import socket as _socket_mod, _socket as _csocket
    def _no_network(*args, **kwargs):
        raise OSError("network access is disabled in the evaluation sandbox")
    class _NoSocket(_socket_mod.socket):
        def __init__(self, *args, **kwargs):
            _no_network()
    for _mod in (_socket_mod, _csocket):
        _mod.socket = _NoSocket
        _mod.SocketType = _NoSocket
        for _name in ("create_connection", "create_server", "getaddrinfo", "gethostbyname", "gethostbyname_ex",
                      "gethostbyaddr", "socketpair", "fromfd"):
            if hasattr(_mod, _name):
                setattr(_mod, _name, _no_network)
_sys.argv = [_path]
del _ctypes, _resource, _mem, _cpu, _netns, _block
_runpy.run_path(_path, run_name="__main__")
""" % (_CLONE_NEWUSER, _CLONE_NEWNET)


@dataclass
class ExecResult:
    passed: bool           # exit status 0 within the limits
    returncode: int | None  # None when killed on timeout
    timed_out: bool
    seconds: float
    output_tail: str       # last characters of stdout+stderr, for the predictions file


def run_program(program: str, timeout_s: float = 10.0, memory_mb: int = 1024, net_namespace: bool = True,
                block_sockets: bool = True) -> ExecResult:
    """Runs ``program`` with the limits of the module docstring; passed = exit status 0.

    Args:
        program: Python source to run as ``__main__``.
        timeout_s: Wall-time limit; the process group is killed when it passes.
        memory_mb: Address-space limit.
        net_namespace: Enter a new network namespace (where the kernel allows it).
        block_sockets: Block Python's socket constructors (``False`` only to test the layers apart).
    """
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="middo-exec-") as tmp:
        path = os.path.join(tmp, "program.py")
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(program)
        argv = [sys.executable, "-I", "-c", _BOOTSTRAP, str(memory_mb), str(int(timeout_s) + 1),
                "1" if net_namespace else "0", "1" if block_sockets else "0", path]
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": tmp, "TMPDIR": tmp}
        out_path = os.path.join(tmp, "output.txt")
        with open(out_path, "wb") as out:
            proc = subprocess.Popen(argv, cwd=tmp, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)
            timed_out = False
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                # The program's own session: kills it on timeout and anything it left running.
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
                proc.wait()
        with open(out_path, "rb") as fh:
            fh.seek(max(0, os.path.getsize(out_path) - 2000))
            tail = fh.read().decode("utf-8", "replace")
    code = None if timed_out else proc.returncode
    return ExecResult(passed=code == 0, returncode=code, timed_out=timed_out, seconds=time.time() - t0,
                      output_tail=tail)


# ---------------------------------------------------------------------------------------------
# From a model's answer to a program.

_FENCE_RE = re.compile(r"```[ \t]*(?:python|py|Python|python3)?[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL)


def extract_code(text: str) -> str:
    """The first fenced code block of an answer (an unclosed fence runs to the end), else the whole text."""
    text = text or ""
    m = _FENCE_RE.search(text)
    return m.group(1) if m else text


def humaneval_program(problem: dict, completion: str) -> str:
    """HumanEval program: the answer's code and the tests, then ``check(entry_point)``.

    An answer that defines ``entry_point`` itself (an instruction model writing the whole function) is
    placed after the prompt, whose imports it may need and whose stub it replaces; any other answer is
    taken as the body that continues the prompt (the canonical-solution form).
    """
    code = extract_code(completion)
    entry = problem["entry_point"]
    if re.search(rf"^\s*def\s+{re.escape(entry)}\s*\(", code, re.MULTILINE):
        body = problem["prompt"] + "\n\n" + code
    else:
        body = problem["prompt"] + code
    return f"{body}\n\n{problem['test']}\n\ncheck({entry})\n"


def mbpp_program(problem: dict, completion: str) -> str:
    """MBPP program: the answer's code, the task's setup code, then its ``assert`` lines.

    The setup comes after the code because it builds test inputs with classes the solution defines
    (tasks 367 and 927 make trees of the solution's ``Node``).
    """
    code = extract_code(completion)
    setup = problem.get("test_setup_code") or ""
    tests = "\n".join(problem["test_list"])
    return f"{code}\n\n{setup}\n{tests}\n"
