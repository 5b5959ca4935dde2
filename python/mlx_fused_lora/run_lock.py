"""One writer per output folder: a lock file every command that writes a run folder takes first.

``with run_lock(folder, "--output-dir"):`` takes an exclusive ``fcntl.flock`` on
``folder/.mlx-fused-lora.lock`` before anything else is written there and holds it for the
whole run. A second process asking for the same folder is refused at once with
`FolderInUseError`, one line naming the holder's pid and command; it writes nothing. The
kernel drops a flock when its process dies, so a killed run never blocks the next one; the
lock file it left behind (it still names the dead pid) is recognised, reported in one
warning and taken over. A clean exit removes the file, and the folder too when the lock
created it and nothing else was written.

The lock is re-entrant within a process (the CLI holds it, and the trainer it calls asks
again); two different folders never interact. It is advisory: it binds the processes that
take it, which is every command of this package that writes a run folder. flock is
per host on network file systems that emulate it, which is the case it is for: two runs
started on one machine. Imports nothing from the package and not MLX.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import shlex
import socket
import sys
import time
from pathlib import Path

__all__ = ["FolderInUseError", "LOCK_NAME", "run_lock", "file_lock"]

LOCK_NAME = ".mlx-fused-lora.lock"
_HOLDER_WAIT_S = 2.0  # how long a refused process waits for the holder to have written its pid

log = logging.getLogger(__name__)

_held: dict[str, list] = {}  # resolved lock path -> [fd, depth] for the locks this process holds


class FolderInUseError(RuntimeError):
    """Another process holds the folder's lock."""


def _describe(holder: dict) -> str:
    parts = [f"pid {holder.get('pid', '?')}"]
    if holder.get("host") and holder["host"] != socket.gethostname():
        parts[0] += f" on {holder['host']}"
    if holder.get("command"):
        command = str(holder["command"])
        parts.append(command if len(command) <= 60 else command[:57] + "...")
    if holder.get("started"):
        parts.append(f"since {holder['started']}")
    return ", ".join(parts)


def _read_holder(fd: int) -> dict:
    try:
        text = os.pread(fd, 4096, 0).decode(errors="replace").strip()
        return json.loads(text) if text else {}
    except (OSError, ValueError):
        return {}


def _wait_for_holder(fd: int) -> dict:
    """The holder's record; it writes it right after taking the lock, so allow it a moment."""
    deadline = time.monotonic() + _HOLDER_WAIT_S
    holder = _read_holder(fd)
    while not holder.get("pid") and time.monotonic() < deadline:
        time.sleep(0.02)
        holder = _read_holder(fd)
    return holder


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def _open_locked(path: Path, what: str, target: Path) -> int:
    """An fd of ``path`` holding its exclusive flock; refuses when another process holds it."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                os.close(fd)
                raise
            holder = _wait_for_holder(fd)
            os.close(fd)
            raise FolderInUseError(
                f"{what} {target} is in use by another run ({_describe(holder)}): one run writes to a "
                f"folder at a time; wait for it to end or choose another {what}"
            ) from None
        # The holder before us may have removed the file between our open and our flock:
        # then we hold a lock on a file nobody else can see; open the path again.
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)


def _take_over(fd: int, path: Path, what: str, target: Path) -> None:
    """Report a lock file left by a process that no longer holds it, then write ours."""
    old = _read_holder(fd)
    pid = old.get("pid")
    if isinstance(pid, int) and pid != os.getpid():
        gone = "is no longer running" if not _alive(pid) else "no longer holds it"
        log.warning(
            "%s %s: taking over the lock file %s left by a run that ended without removing it (%s, which %s)",
            what,
            target,
            path.name,
            _describe(old),
            gone,
        )
    record = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "command": shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv and sys.argv[0] else "python",
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)


@contextlib.contextmanager
def run_lock(folder: str | Path, what: str = "--output-dir", name: str = LOCK_NAME, shown: Path | None = None):
    """Hold the lock of ``folder`` (created if missing) for the ``with`` block.

    ``what`` names the folder's flag in messages, ``shown`` the path they name (default:
    the folder). Raises `FolderInUseError` when another process holds it, `OSError` when
    the folder cannot be created or written.
    """
    folder = Path(folder)
    shown = folder if shown is None else shown
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    key = os.path.realpath(path)
    if key in _held:  # this process already holds it
        _held[key][1] += 1
        try:
            yield path
        finally:
            _held[key][1] -= 1
        return
    fd = _open_locked(path, what, shown)
    try:
        _take_over(fd, path, what, shown)
    except BaseException:
        os.close(fd)
        raise
    _held[key] = [fd, 1]
    try:
        yield path
    finally:
        del _held[key]
        # Removed while still held, so no other process can be holding this inode; one
        # that opened it just before sees it gone after its flock and opens the path anew.
        with contextlib.suppress(OSError):
            path.unlink()
        os.close(fd)
        if created:
            with contextlib.suppress(OSError):
                folder.rmdir()  # only when empty: nothing but our lock file was ever there


def file_lock(path: str | Path, what: str = "--out"):
    """The lock of one output file (``.NAME.lock`` beside it): for commands whose output is a
    file in a shared folder (a results file), where other files' writers are no concern."""
    path = Path(path)
    return run_lock(path.parent, what, name=f".{path.name}.lock", shown=path)
