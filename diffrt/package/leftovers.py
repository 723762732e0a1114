"""Temporary folders of the atomic writers: names that record who writes them, and cleaning up after killed runs.

A package is built in `.NAME.tmp-PID@HOST-XXXXXXXX` beside its target, and an old package being replaced is moved
into `.NAME.old-PID@HOST-XXXXXXXX` for a moment. A run killed with SIGKILL (or a power cut) cannot remove them, and
a package-sized folder would stay forever. The next writer of the same target calls `remove_stale_temp`: it removes
those whose process is gone on this host, restores an old package whose replacement never arrived, and only reports
(never deletes) folders of another host or of diffrt versions that did not record the process.
"""
from __future__ import annotations

import logging
import os
import re
import shutil
import socket
from functools import lru_cache
from pathlib import Path

logger = logging.getLogger(__name__)

KINDS = ("tmp", "old")
# tempfile.mkdtemp's random suffix: 8 of [a-z0-9_]
_SUFFIX = r"[a-z0-9_]{8}"
_MARKED = re.compile(rf"^(?P<kind>tmp|old)-(?P<pid>\d+)@(?P<host>[A-Za-z0-9.-]+)-{_SUFFIX}$")
_UNMARKED = re.compile(rf"^(?P<kind>tmp|old)-{_SUFFIX}$")


@lru_cache(maxsize=1)
def host_name() -> str:
    """This machine's name as it appears in temp folder names (file-name safe, bounded length)."""
    return re.sub(r"[^A-Za-z0-9.-]", "-", socket.gethostname())[:64] or "localhost"


def temp_prefix(name: str, kind: str) -> str:
    """`.NAME.KIND-PID@HOST-`: the prefix of a temp folder (`kind` tmp or old) this process makes beside NAME."""
    return f".{name}.{kind}-{os.getpid()}@{host_name()}-"


def is_temp_folder(path: Path) -> bool:
    """Whether `path` is a folder named as diffrt's writers name their temp folders (`.NAME.tmp-*`, `.NAME.old-*`)."""
    name = path.name
    if not name.startswith(".") or not path.is_dir():
        return False
    starts = (match.end() for match in re.finditer(r"(?<=.)\.(?=(?:tmp|old)-)", name[1:]))
    return any(_MARKED.match(name[1 + start:]) or _UNMARKED.match(name[1 + start:]) for start in starts)


def remove_stale_temp(target: Path) -> list[Path]:
    """Remove the temp folders beside `target` that killed writers left; returns the removed paths.

    A `.old-` folder whose package was never replaced (the run died between its two renames, `target` is absent)
    is put back as `target` instead of deleted: the user did not lose the old package.
    """
    target = Path(target)
    parent, prefix = target.parent, f".{target.name}."
    try:
        entries = sorted(p for p in parent.iterdir() if p.name.startswith(prefix) and p.is_dir())
    except OSError:  # no parent yet (nothing to clean), or one we cannot list: the write itself will say why
        return []
    removed = []
    for folder in entries:
        rest = folder.name[len(prefix):]
        marked = _MARKED.match(rest)
        if marked is None:
            if _UNMARKED.match(rest):
                logger.warning("%s may be left by an interrupted diffrt run (it does not record its process); "
                               "delete it if no export to %s is running", folder, target)
            continue
        pid, host = int(marked["pid"]), marked["host"]
        if host != host_name():
            logger.warning("%s belongs to a diffrt run on host %s; delete it if that run is gone", folder, host)
            continue
        if _running(pid, folder):
            continue
        if marked["kind"] == "old" and (folder / target.name).is_dir() and not target.exists():
            os.replace(folder / target.name, target)
            logger.warning("restored %s from %s: the run (pid %d) that was replacing it was killed", target,
                           folder, pid)
        shutil.rmtree(folder, ignore_errors=True)
        logger.info("removed %s, left by a diffrt run (pid %d) that is no longer running", folder, pid)
        removed.append(folder)
    return removed


def _running(pid: int, folder: Path) -> bool:
    """Whether process `pid` of this host may still be writing `folder`.

    A zombie is not running; a pid the system has since given to a newer process (started after `folder` last
    changed) is not the writer. Unknown is treated as running: a live export's folder must never be deleted.
    """
    if pid == os.getpid() or os.name == "nt":  # Windows: os.kill(pid, 0) would send CTRL_C_EVENT, not probe
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    state = _process_state(pid)
    if state is None:
        return True
    status, started = state
    if status == "Z":
        return False
    try:
        changed = folder.stat().st_mtime
    except OSError:
        return False
    return started <= changed + 1.0  # one second of slack for the clock-tick resolution of the start time


def _process_state(pid: int) -> tuple[str, float] | None:
    """Linux: the process' state letter (Z: a dead, unreaped zombie) and start time (epoch seconds); None where
    /proc does not tell."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        boot = next(line for line in Path("/proc/stat").read_text().splitlines() if line.startswith("btime "))
    except (OSError, StopIteration):
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) ": state is field 3, starttime field 22
    started = int(boot.split()[1]) + int(fields[19]) / os.sysconf("SC_CLK_TCK")
    return fields[0], started
