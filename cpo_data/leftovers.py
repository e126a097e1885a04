"""What a killed process leaves behind: temporary files and folders it owned, child processes.

A writer that is SIGKILLed (the OOM killer, a scheduler's time limit, `kill -9`) runs no
cleanup, so its temporary names stay. Each such name carries an owner tag (`stamped`), and a
later writer removes the ones whose owner is gone (`sweep`): never a live writer's, whatever
its age.

    name = stamped(".tmp-seg-")         # .tmp-seg-<host>_<pid>_<start>_<unique>
    sweep(fs, folder, ".tmp-seg-")      # removes those whose process is gone

The owner tag names the host, the process id and the process's start time (Linux: from
`/proc/<pid>/stat`), so a pid reused by a later process does not keep a dead writer's files.
On this host, "gone" is read from `/proc` (where `/proc/<pid>` cannot be read, a hidepid mount or
not Linux: from the pid alone). Another host's processes cannot be seen, so its names are removed
only once older than `OTHER_HOST_MAX_AGE_S`.

Child processes: `dying_with_parent(argv)` is `argv` run so that the kernel signals it when
this process dies, SIGKILL included (Linux only): `subprocess.Popen(dying_with_parent(argv))`.
"""

from __future__ import annotations

import os
import posixpath
import re
import signal
import socket
import sys
import time
import uuid
from datetime import datetime
from functools import cache

# A week: no temporary file or publish folder here takes that long to write (a large publish
# to object storage takes hours at most), while a week of leftovers costs only disk space.
# Deleting a live writer's files would break its write; keeping a dead one's costs space only.
OTHER_HOST_MAX_AGE_S = 7 * 24 * 3600

_TAG = re.compile(r"(?P<host>[A-Za-z0-9.-]+)_(?P<pid>\d+)_(?P<start>\d+)(?=_|$)")
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


@cache
def _host() -> str:
    """This machine as seen by its processes: the host name, plus the pid namespace on Linux.

    Containers on one machine may share a host name (`--network host`) while each has its own
    pids: a process in another container is invisible here, so it must count as another
    host, not as a dead process on this one."""
    name = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname()) or "host"
    try:
        namespace = os.readlink("/proc/self/ns/pid")  # "pid:[4026531836]"
    except OSError:
        return name
    return f"{name}.{re.sub(r'[^0-9]', '', namespace)}"


def _read_start_time(pid: int) -> int | None:
    """The start time of process `pid` in clock ticks since boot, from `/proc/<pid>/stat`
    (Linux); None when it is a zombie (dead, not yet reaped by its parent). Raises OSError
    when the file cannot be read: no such process, or one hidden from us (hidepid)."""
    with open(f"/proc/{pid}/stat", "rb") as stat:
        fields = stat.read().rsplit(b")", 1)[1].split()  # after "(comm)", which may hold spaces
    # fields[0] is field 3 of proc(5), the state; the start time is field 22.
    return None if fields[0] == b"Z" else int(fields[19])


def _start_time(pid: int) -> int | None:
    """`_read_start_time`, None where it cannot be read."""
    try:
        return _read_start_time(pid)
    except (OSError, IndexError, ValueError):
        return None


def _has_proc() -> bool:
    return sys.platform.startswith("linux") and os.path.isdir("/proc/self")


def owner_tag() -> str:
    """A file-name-safe tag naming this process: `<host>_<pid>_<start>`; `start` is 0 where
    the start time cannot be read (not Linux)."""
    pid = os.getpid()
    start = (_start_time(pid) if _has_proc() else None) or 0
    return f"{_host()}_{pid}_{start}"


def stamped(prefix: str) -> str:
    """A new temporary name: `prefix`, this process's owner tag, and a unique suffix, so that
    `sweep(fs, folder, prefix)` can tell whose it is."""
    return f"{prefix}{owner_tag()}_{uuid.uuid4().hex[:12]}"


def _alive(pid: int, start: int) -> bool:
    if pid <= 0:  # no writer's pid; and os.kill(0, ...) would mean this process group
        return False
    if _has_proc():
        try:
            found = _read_start_time(pid)
        except (OSError, IndexError, ValueError):
            # Unreadable: gone, or hidden by a hidepid mount (which can also look like gone,
            # ENOENT). Reading it as gone would delete a live writer's files; the pid decides.
            pass
        else:
            return found is not None and (start == 0 or found == start)
    try:
        os.kill(pid, 0)  # the pid alone: a reused pid keeps a dead owner's names (safe side)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: running
        return True
    return True


def owner_gone(tag: str, modified: float | None = None) -> bool:
    """Whether the process that `tag` names is gone. On this host: not running (or a later
    process holds its pid). On another host: only when `modified` (epoch seconds) is older
    than `OTHER_HOST_MAX_AGE_S`. A tag that does not parse is never gone: not ours to judge."""
    match = _TAG.fullmatch(tag)
    if match is None:
        return False
    if match["host"] == _host():
        return not _alive(int(match["pid"]), int(match["start"]))
    return (modified is not None
            and time.time() - modified > OTHER_HOST_MAX_AGE_S)


def _modified(info: dict) -> float | None:
    """An entry's modification time from an fsspec listing (names differ per filesystem)."""
    for key in ("mtime", "LastModified", "last_modified", "updated", "created"):
        value = info.get(key)
        if isinstance(value, datetime):
            return value.timestamp()
        if isinstance(value, int | float):
            return float(value)
        if isinstance(value, str):
            try:
                return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
            except ValueError:
                continue
    return None


def sweep(fs, folder: str, prefix: str) -> list[str]:  # noqa: ANN001 - an fsspec filesystem
    """Remove the entries of `folder` (files or folders) named `prefix` + an owner tag whose
    owner is gone; the paths removed. An entry (or `folder`) that vanishes meanwhile, removed
    by another sweeper or renamed by its owner, is skipped; other errors are raised."""
    try:
        entries = fs.ls(folder, detail=True)
    except FileNotFoundError:
        return []
    removed = []
    for info in entries:
        path = info["name"].rstrip("/")
        name = posixpath.basename(path)
        match = _TAG.match(name[len(prefix):]) if name.startswith(prefix) else None
        if match is None or not owner_gone(match[0], _modified(info)):
            continue
        try:
            fs.rm(path, recursive=info.get("type") == "directory")
        except FileNotFoundError:
            continue
        removed.append(path)
    return removed


# Run by `dying_with_parent` as `python -c _TIE PARENT SIG ARGV...`, then replaced (exec) by
# ARGV, keeping its pid. The setting outlives exec; it lives here, not in a `preexec_fn`, because
# Popen's preexec_fn runs Python between fork and exec, which can deadlock in a parent with
# threads (the CLI has Prefect's). The pid check: a parent that died before prctl took hold
# sends no signal, and the child now has another parent (init or a subreaper).
_TIE = f"""\
import ctypes, os, sys
parent, sig, argv = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
if ctypes.CDLL(None, use_errno=True).prctl({_PR_SET_PDEATHSIG}, sig, 0, 0, 0) != 0:
    raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
if os.getppid() != parent:
    sys.exit(128 + sig)
try:
    os.execvp(argv[0], argv)
except OSError as error:
    print(f"{{argv[0]}}: {{error.strerror}}", file=sys.stderr)
    sys.exit(127)
"""


def _tied(argv: list[str], sig: int, parent: int) -> list[str]:
    """`argv` behind the `_TIE` script, which expects `parent` as its parent."""
    # -I -S: the script needs only the standard library, so no site-packages or PYTHON*
    # variables (they still reach ARGV: the environment is left as it is).
    return [sys.executable, "-I", "-S", "-c", _TIE, str(parent), str(int(sig)), *argv]


def dying_with_parent(argv: list[str], sig: int = signal.SIGTERM) -> list[str]:
    """`argv` as a command that receives `sig` when this process dies, however it dies, for
    `subprocess.Popen` (a list: no shell, no `executable=`); the child keeps its pid, so
    `Popen.terminate()` and `wait()` reach `argv` itself. A program that cannot be run is
    not raised by Popen: the child says so on its stderr and exits 127, as a shell does.
    `argv` unchanged where the kernel has no such setting (not Linux).

    Linux sends `sig` when the *thread* that started the child ends, not the process: start
    the child from a thread that outlives it (the main thread, or one that waits for it)."""
    argv = [os.fspath(arg) for arg in argv]
    if not argv:
        raise ValueError("dying_with_parent: an empty command")
    if not sys.platform.startswith("linux"):
        return argv
    return _tied(argv, sig, os.getpid())
