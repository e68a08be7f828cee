"""Output directories biaslab may write into, and the lock that keeps two processes out of one run directory.

One rule for every verb that writes a directory (audit, mitigate, probe, export):
- a directory that does not exist, or exists and is empty, is used;
- a directory biaslab recognises as its own (a run directory whose ``manifest.json`` it wrote, or an export
  holding its ``biaslab_patch.json``) is resumed when the arguments match, refused when they differ, and
  replaced as a whole with ``--force`` (only then, and only because biaslab made it);
- anything else — a file, a path under a file, a non-empty directory biaslab did not create — is refused,
  ``--force`` or not: biaslab never deletes or overwrites what it did not create.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from .errors import BiaslabError, RunConflictError

MANIFEST = "manifest.json"
LOCK = ".biaslab.lock"
RUN_MARK = "biaslab_run"            # key of every manifest.json biaslab writes
EXPORT_MARK = "biaslab_patch.json"  # file of every export biaslab writes


def check_target(path, *, flag: str = "--out") -> Path:
    """``path`` as a usable output location: not empty, not a file, not under a file, its parent writable."""
    if path is None or str(path).strip() == "":
        raise BiaslabError(f"{flag} is empty: name a directory to write into")
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise BiaslabError(f"{flag} {p} is a file, not a directory; choose another {flag}")
    for parent in p.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise BiaslabError(f"{flag} {p} lies under {parent}, which is a file; choose another {flag}")
            if not os.access(parent, os.W_OK | os.X_OK) and not p.exists():
                raise BiaslabError(f"cannot create {p}: {parent} is not writable; choose another {flag}")
            break
    if p.exists() and not os.access(p, os.W_OK | os.X_OK):
        raise BiaslabError(f"{flag} {p} is not writable; choose another {flag}")
    return p


def read_manifest(path: Path) -> dict | None:
    """The manifest biaslab wrote in ``path``, None when there is none; a corrupt one is one clear error."""
    m = path / MANIFEST
    if not m.exists():
        return None
    try:
        doc = json.loads(m.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise BiaslabError(f"{m} is not readable JSON ({e.__class__.__name__}); it is not a run directory biaslab can "
                           "resume or replace — move it away or choose another --out") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("args"), dict):
        raise BiaslabError(f"{m} is not a biaslab run manifest (no 'args' object); choose another --out")
    return doc


def is_own_run(path: Path) -> bool:
    try:
        doc = read_manifest(path)
    except BiaslabError:
        return False
    return doc is not None


def _contents(p: Path) -> list[str]:
    return sorted(x.name for x in p.iterdir() if x.name != LOCK) if p.is_dir() else []


def preflight(path) -> None:
    """Refuse, before anything is written, a non-empty directory that is not a biaslab run."""
    p = Path(path)
    names = _contents(p)
    if names and read_manifest(p) is None:
        raise RunConflictError(f"{p} is not empty and is not a biaslab run directory (it holds "
                               f"{', '.join(names[:5])}{' …' if len(names) > 5 else ''}); biaslab never writes into or "
                               "deletes a directory it did not create — choose another --out")


def claim_run_dir(path, args: dict, *, force: bool) -> tuple[Path, dict | None]:
    """Check ``path`` under the rule above for a run with ``args``. Returns (path, the old manifest to resume, or
    None for a fresh run); with ``force`` a different run of biaslab's own is removed first."""
    p = check_target(path)
    if not _contents(p):
        return p, None
    preflight(p)
    old = read_manifest(p)
    if old.get("args") == args:
        return p, old
    if not force:
        diff = sorted(k for k in set(old["args"]) | set(args) if old["args"].get(k) != args.get(k))
        was = old["args"].get("dtype", "float32")
        dtype = f"; it was run in {was}: pass --dtype {was} to resume it" if "dtype" in diff else ""
        raise RunConflictError(f"{p} holds a run made with different arguments (differs in: {', '.join(diff)}){dtype}; "
                               "choose another --out, or pass --force to replace that run")
    remove_own_run(p)
    return p, None


def remove_own_run(p: Path) -> None:
    """Delete a run directory biaslab made (checked again here), keeping the lock file of the process holding it."""
    if read_manifest(p) is None:
        raise BiaslabError(f"refusing to delete {p}: it is not a biaslab run directory")
    for child in p.iterdir():
        if child.name == LOCK:
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


# ------------------------------------------------------------------------------------------------ the lock
_HELD: dict[str, tuple[int, int]] = {}   # resolved path -> (fd, depth) held by this process


class DirLock:
    """An OS file lock on ``DIR/.biaslab.lock`` (``fcntl.flock``): held while a run writes the directory, released
    on exit or by the OS when the process dies (so a stale lock of a killed process never blocks a rerun). A second
    process is refused with the holder's pid; the same process may take it again (nested writers)."""

    def __init__(self, path):
        self.path = Path(path)
        self.key = str(self.path.resolve())

    def acquire(self) -> "DirLock":
        import fcntl

        if self.key in _HELD:
            fd, depth = _HELD[self.key]
            _HELD[self.key] = (fd, depth + 1)
            return self
        self.path.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise BiaslabError(f"{self.path} is in use by another biaslab process (pid {holder}); wait for it to "
                               "finish, or choose another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        _HELD[self.key] = (fd, 1)
        return self

    def release(self) -> None:
        import fcntl

        if self.key not in _HELD:
            return
        fd, depth = _HELD[self.key]
        if depth > 1:
            _HELD[self.key] = (fd, depth - 1)
            return
        del _HELD[self.key]
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)

    def __enter__(self) -> "DirLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
