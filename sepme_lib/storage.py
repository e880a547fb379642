"""Writing to disk without losing anything: atomic files and folders, and a lock on an output folder.

Used by ``Delta.save`` (``deltas.py``), ``Delta.save_lora`` (``lora.py``) and ``sepme erase`` (``cli.py``):

* :func:`atomic_file`: write into a temporary file beside the target, then rename it over the target; a killed or
  failed write (a full disk) leaves the old file and no partial one, and the error names the path.
* :func:`atomic_folder`: the same for a folder of files (a temporary folder beside it, then a rename); the old folder
  comes back if the swap fails.
* :class:`FolderLock`: ``out/.sepme.lock`` created with ``O_CREAT | O_EXCL`` holding the pid; a second run into the
  same folder is refused, a lock whose process is gone is taken over (with a message).
"""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

from .config import BadValue, SepmeError

LOCK = ".sepme.lock"


class StorageError(SepmeError, OSError):
    """A file or folder could not be written (the message names the path, the reason and the fix)."""


def _fail(path, e: OSError, error) -> None:
    raise error(f"could not write {path}: {e.strerror or e} ({type(e).__name__}); nothing was changed there. "
                "Free disk space or choose a writable path, then save again") from None


def atomic_file(path: Path, write, error=StorageError) -> Path:
    """``write(tmp_path)`` into a temporary file in ``path``'s folder, then ``os.replace`` it over ``path``."""
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
    except OSError as e:
        _fail(path, e, error)
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as e:
        _fail(path, e, error)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def atomic_folder(folder: Path, files: dict, error=StorageError) -> Path:
    """Write ``files`` (``{file name: write(path)}``) into a temporary folder beside ``folder``, then put it in place
    of ``folder`` (an existing one is moved aside first and deleted after, or moved back if the swap fails)."""
    folder = Path(folder)
    parent = folder.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=parent))
    except OSError as e:
        _fail(folder, e, error)
    old = None
    try:
        for name, write in files.items():
            try:
                write(tmp / name)
            except OSError as e:
                _fail(folder / name, e, error)
        try:
            if folder.exists():
                old = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".old", dir=parent))
                os.rmdir(old)
                os.replace(folder, old)
            os.replace(tmp, folder)
        except OSError as e:
            if old is not None and old.exists() and not folder.exists():
                os.replace(old, folder)
            _fail(folder, e, error)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


class FolderLock:
    """``with FolderLock(folder, what="--out"):`` holds ``folder/.sepme.lock`` (the pid) while a run writes there.

    A lock of a living process (this one included) is refused with ``error`` naming the folder and the pid; a lock
    left by a process that no longer exists is taken over with a message on stderr. The lock file is removed on exit,
    and the folder too when the lock made it and it is empty."""

    def __init__(self, folder, what: str = "folder", error=BadValue):
        self.folder, self.what, self.error = Path(folder), what, error
        self.path = self.folder / LOCK
        self.made = False

    def __enter__(self):
        self.made = not self.folder.exists()
        self.folder.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                try:
                    pid = int(self.path.read_text().strip() or "0")
                except (OSError, ValueError):
                    pid = 0
                if pid and pid_alive(pid):
                    raise self.error(f"{self.what} {self.folder}: another run (pid {pid}) is writing there (lock file "
                                     f"{self.path}); wait for it to finish or use another {self.what}") from None
                print(f"{self.what} {self.folder}: taking over the lock of pid {pid or '?'}, which no longer runs",
                      file=sys.stderr)
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                f.write(str(os.getpid()))
            return self
        raise self.error(f"{self.what} {self.folder}: could not take the lock {self.path}; remove it if no run "
                         "is writing there")

    def __exit__(self, *exc):
        self.path.unlink(missing_ok=True)
        if self.made:
            try:
                self.folder.rmdir()  # only when empty
            except OSError:
                pass
        return False
