"""One writer per run: a lock file held for as long as a pipeline or a task step writes the run.

The lock file names its holder (pid, host, start time). It appears whole (written under a temporary name,
then linked into place, which fails if the name is taken) and is held with flock(2), which the kernel
releases when the holder dies, SIGKILL included. So a lock file whose flock nobody holds was left by a
dead process: it is taken over with a warning. A lock file whose flock is held refuses the newcomer with
one line naming the holder, unless the newcomer descends from that holder: holders list themselves in
HOLDER_ENV for their child processes (a pipeline's task steps). The children of `python -m sapt run_lock`
inherit the lock, so a run stays locked while any of them runs, even after the holder was killed alone.
The holder removes the file when done.

    python -m sapt run_lock LOCK_FILE... -- COMMAND...

runs COMMAND holding the lock files (the generated pipelines run themselves this way), or stops at once
with exit status EXIT_LOCKED. Where a run keeps its lock file is the run-folder format's business
(sapt.run_files.RUN_LOCK_FILE); this module locks the paths it is given.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from .fileio import EXIT_WRITE, WriteError, temporary_beside
from .logs import setup_cli_logging

HOLDER_ENV = "SAPT_RUN_LOCK_HOLDER"  # the lock holders a process descends from: "pid@host,..."
EXIT_LOCKED = 75  # exit status when the run is in use (sysexits' EX_TEMPFAIL: try again later)
# A holder's children inherit its lock; when the holder has ended but the lock is still held, they may be
# ending too (a process group killed a moment ago): wait this long for them before refusing.
ENDING_GRACE_S = 10.0
PROG = "sapt run_lock"

logger = logging.getLogger(__name__)


class RunLocked(Exception):
    """Another live process holds the lock (one-line message naming it)."""


@dataclass(frozen=True)
class Holder:
    pid: int
    host: str
    started: str  # UTC, ISO 8601

    @classmethod
    def this_process(cls) -> Holder:
        return cls(os.getpid(), socket.gethostname(), time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))

    @property
    def identity(self) -> str:
        return f"{self.pid}@{self.host}"

    def __str__(self) -> str:
        return f"pid {self.pid} on {self.host} since {self.started}"


def _read_holder(fd: int) -> Holder | str:
    """The holder a lock file names, or a description of what is there instead."""
    try:
        return Holder(**json.loads(os.pread(fd, 4096, 0)))
    except (ValueError, TypeError):
        return "an unknown process (the lock file does not name one)"


def _flock(fd: int) -> bool:
    """Take the flock of an open lock file without waiting; False if another open file holds it."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def _same_file(path: Path, fd: int) -> bool:
    """Whether `path` still names the file open as `fd` (a takeover may have replaced it)."""
    try:
        found, held = os.stat(path), os.fstat(fd)
    except FileNotFoundError:
        return False
    return (found.st_dev, found.st_ino) == (held.st_dev, held.st_ino)


def _is_ancestor(holder: Holder | str) -> bool:
    return isinstance(holder, Holder) and holder.identity in os.environ.get(HOLDER_ENV, "").split(",")


def _in_use(path: Path, holder: Holder | str) -> str:
    user = f"processes started by {holder}, which has ended" if _has_ended(holder) else str(holder)
    return f"{path}: this run is in use by {user}; run again once it has ended"


def _has_ended(holder: Holder | str) -> bool:
    """Whether the holder a lock file names is a process of this host that is no longer running."""
    if not isinstance(holder, Holder) or holder.host != socket.gethostname():
        return False
    try:
        os.kill(holder.pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # running, as another user
        pass
    return False


def _new_lock_file(path: Path, holder: Holder) -> tuple[int, str]:
    """A temporary file beside `path` naming `holder`, open and flocked: (fd, its path)."""
    tmp = temporary_beside(path)
    try:
        Path(tmp).write_text(json.dumps(asdict(holder)) + "\n")
        fd = os.open(tmp, os.O_RDWR)
    except OSError as err:
        Path(tmp).unlink(missing_ok=True)
        raise WriteError(path, err.strerror or str(err), err.errno) from err
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # nobody else has this file open: never waits
    except OSError as err:  # a filesystem without locks
        os.close(fd)
        Path(tmp).unlink(missing_ok=True)
        raise WriteError(path, f"the filesystem refused a lock ({err.strerror or err})", err.errno) from err
    return fd, tmp


def _acquire(path: Path) -> int | None:
    """Hold the lock file `path`: its open, flocked fd; None when an ancestor of this process holds it."""
    fd, tmp = _new_lock_file(path, Holder.this_process())
    grace_end = time.monotonic() + ENDING_GRACE_S
    try:
        while True:
            try:
                os.link(tmp, path)  # whole and ours, or FileExistsError
                return fd
            except FileExistsError:
                pass
            try:
                found = os.open(path, os.O_RDWR)  # NFS grants an exclusive flock only to a writer
            except FileNotFoundError:  # released meanwhile: try again
                continue
            except OSError as err:  # another user's, say
                raise RunLocked(f"{path}: cannot open this run's lock ({err.strerror or err})") from err
            try:
                holder = _read_holder(found)
                if not _flock(found):
                    if _is_ancestor(holder):
                        os.close(fd)
                        return None
                    if _has_ended(holder) and time.monotonic() < grace_end:  # its children are still ending
                        time.sleep(0.1)
                        continue
                    raise RunLocked(_in_use(path, holder))
                if not _same_file(path, found):  # another newcomer took it over first: look again
                    continue
                os.replace(tmp, path)
                logger.warning("%s: taking over the lock left by %s, which is no longer running", path, holder)
                return fd
            finally:
                os.close(found)
    except BaseException:
        os.close(fd)
        raise
    finally:
        Path(tmp).unlink(missing_ok=True)  # after link() a second name of the lock file; gone after replace()


@contextmanager
def run_lock(path: str | Path):
    """Hold the lock file `path` for the block (RunLocked if another live process holds it). Yields the
    lock's open file descriptor, which child processes may inherit, or None when an ancestor holds it."""
    path = Path(path)
    made = [folder for folder in (path.parent, *path.parent.parents) if not folder.exists()]  # deepest first
    fd = _acquire(path)
    try:
        yield fd
    finally:
        if fd is not None:
            if _same_file(path, fd):  # nobody can replace it while we hold the flock
                path.unlink()
            os.close(fd)
        for folder in made:  # made for the lock alone (a run stopped by a user mistake): leave no trace
            try:
                folder.rmdir()
            except OSError:  # not empty: the run wrote there
                break


def holder_env(env: dict) -> dict:
    """`env` for child processes of a lock holder: they are let into the runs it holds."""
    inherited = env.get(HOLDER_ENV)
    identity = Holder.this_process().identity
    return {**env, HOLDER_ENV: f"{inherited},{identity}" if inherited else identity}


def main(argv: list[str] | None = None) -> int:
    """`python -m sapt run_lock LOCK_FILE... -- COMMAND...`: COMMAND's exit status, or EXIT_LOCKED."""
    argv = sys.argv[1:] if argv is None else argv
    usage = f"usage: python -m {PROG} LOCK_FILE... -- COMMAND..."
    if argv[:1] in (["-h"], ["--help"]):
        print(f"{usage}\n\nRun COMMAND holding the lock of every LOCK_FILE (a second holder is refused at once).")
        return 0
    split = argv.index("--") if "--" in argv else 0
    if split == 0 or split == len(argv) - 1:
        print(f"{PROG}: error: {usage}", file=sys.stderr)
        return 2
    setup_cli_logging()
    try:
        with ExitStack() as held:
            fds = [held.enter_context(run_lock(path)) for path in sorted(set(argv[:split]))]
            # Ctrl-C reaches COMMAND through the terminal's process group: wait for it to stop. (A
            # handler, not SIG_IGN, so that COMMAND starts with the default.)
            signal.signal(signal.SIGINT, lambda *_: None)
            try:
                return subprocess.call(argv[split + 1:], pass_fds=[fd for fd in fds if fd is not None],
                                       env=holder_env(dict(os.environ)))
            except OSError as err:  # COMMAND could not be started
                print(f"{PROG}: error: cannot run {argv[split + 1]}: {err.strerror or err}", file=sys.stderr)
                return 127
    except (RunLocked, WriteError) as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return EXIT_LOCKED if isinstance(err, RunLocked) else EXIT_WRITE
