"""Run folders that one process owns: names checked, claimed atomically, released when the run ends.

A run folder is claimed by creating ``OWNER_FILE`` in it with ``O_CREAT | O_EXCL`` (one process wins, the
file system decides) holding the owner's pid and host. A second process asking for the same folder is refused
naming the owner; a claim left by a process that died (kill -9) is recognised on the same host and taken over
by ``--resume``. The claim is released (the file removed) when the run ends, however it ends.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError

#: The claim file inside a run folder while a process owns it.
OWNER_FILE = ".owner.json"
#: Longest run name accepted (bytes of UTF-8): file systems stop at 255, and names get suffixes.
MAX_NAME_BYTES = 200


def check_run_name(name: object, where: str = "--run-name") -> str:
    """``name`` if it is one plain path component (no separators, not ``.``/``..``, not too long)."""
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"{where}: expected a non-empty folder name, got {name!r}")
    separators = {"/", "\\", os.sep, os.altsep or "/"}
    if any(s in name for s in separators) or name in (".", "..") or "\0" in name:
        raise ConfigError(f"{where}: expected a single folder name (no '/', '\\', '.' or '..'), got {name!r}; "
                          "run folders are made inside --out")
    if len(name.encode("utf-8")) > MAX_NAME_BYTES:
        raise ConfigError(f"{where}: expected a name of at most {MAX_NAME_BYTES} bytes, got one of "
                          f"{len(name.encode('utf-8'))}")
    return name


def make_folder(path: Path, where: str = "--out") -> None:
    """``mkdir -p path`` with file-system refusals as one line naming the path."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise ConfigError(f"{where}: {path} (or a folder above it) is a file; expected a folder") from None
    except NotADirectoryError:
        raise ConfigError(f"{where}: a part of {path} is a file; expected folders") from None
    except OSError as err:
        raise ConfigError(f"{where}: cannot create {path}: {err.strerror or err}") from None


@dataclass
class Owner:
    """Who holds a claim: process id, host name and when it started."""

    pid: int
    host: str
    started: str

    def alive(self) -> bool:
        """Whether the owner still runs (a claim from another host counts as alive: it cannot be checked)."""
        if self.host != socket.gethostname():
            return True
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def __str__(self) -> str:
        return f"pid {self.pid} on {self.host} (since {self.started})"


def read_owner(folder: Path) -> Owner | None:
    """The claim on ``folder``, if any (an unreadable claim file reads as a dead owner)."""
    path = folder / OWNER_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return Owner(int(data["pid"]), str(data["host"]), str(data["started"]))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError):
        return Owner(-1, socket.gethostname(), "unknown")


def _record() -> bytes:
    owner = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    return json.dumps(owner).encode()


def _create_claim(path: Path) -> bool:
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "wb") as f:
        f.write(_record())
    return True


def claim(folder: Path, resume: bool, where: str = "--run-name") -> None:
    """Claim ``folder`` for this process (made if missing); refused when another live process holds it, or,
    for a new run, when it already holds anything."""
    make_folder(folder, "--out")
    path = folder / OWNER_FILE
    if not _create_claim(path):
        owner = read_owner(folder)
        if owner is not None and owner.alive():
            raise ConfigError(f"run folder {folder} is in use by {owner}; choose another {where} or wait for "
                              f"that run (if it is gone, delete {path})")
        if not resume:
            raise ConfigError(f"run folder {folder} exists and is not empty; choose another {where} or --out")
        # a claim left by a process that died: move it aside, then claim the usual way (one taker wins)
        stale = path.with_name(f"{OWNER_FILE}.stale-{os.getpid()}")
        with contextlib.suppress(FileNotFoundError):
            os.replace(path, stale)
            stale.unlink()
        if not _create_claim(path):
            raise ConfigError(f"run folder {folder} is in use by {read_owner(folder)}; another process resumed "
                              "it first")
    if not resume and any(p.name != OWNER_FILE for p in folder.iterdir()):
        release(folder)
        raise ConfigError(f"run folder {folder} exists and is not empty; choose another {where} or --out")


def release(folder: Path) -> None:
    """Give up this process's claim on ``folder`` (nothing when another process holds it)."""
    owner = read_owner(folder)
    if owner is not None and owner.pid == os.getpid() and owner.host == socket.gethostname():
        with contextlib.suppress(FileNotFoundError):
            (folder / OWNER_FILE).unlink()


@contextlib.contextmanager
def claimed(folder: Path, resume: bool, owner: bool = True, where: str = "--run-name") -> Iterator[Path]:
    """``folder`` claimed while the block runs; a new folder that a failed run left empty is removed.

    ``owner=False`` (torchrun ranks other than 0): nothing is claimed, rank 0 does it.
    """
    if not owner:
        yield folder
        return
    existed = folder.exists()
    claim(folder, resume, where)
    try:
        yield folder
    except BaseException:
        release(folder)
        if not existed:
            with contextlib.suppress(OSError):
                folder.rmdir()  # only when empty: a failed new run leaves no empty folder behind
        raise
    release(folder)


__all__ = ["MAX_NAME_BYTES", "OWNER_FILE", "Owner", "check_run_name", "claim", "claimed", "make_folder",
           "read_owner", "release"]
