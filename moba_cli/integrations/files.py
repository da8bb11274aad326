"""The files of a converted checkpoint: built beside DST, independent of SRC, never at a user's expense.

* Every file of SRC is copied into DST: a reflink (copy-on-write clone, instant and free on btrfs, XFS,
  APFS-like filesystems) where the filesystem has one, else an in-kernel or plain copy. Symlinks are
  followed, so a Hugging Face cache snapshot (relative links into ``blobs/``) gives real files. Hard links
  only with ``link=True``, and then only for weight files: a hard link *is* SRC's file, so writing into DST
  (``save_pretrained``, ``torch.save``) would change SRC.
* DST is built in a hidden sibling ``.<name>.moba-tmp-<host>-<pid>-<random>`` and renamed into place at
  the end. SIGTERM and SIGHUP clean it up like an exception; what a SIGKILL leaves behind is removed by the
  next run on the same host (its pid is gone).
* An existing DST is replaced only when an earlier ``moba convert`` wrote it (its :data:`MARKER` lists the
  files it wrote, with sizes and times) and nothing in it was added or changed since.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import signal
import socket
import sys
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moba_cli.errors import MobaError

MARKER = ".moba-convert"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack")
# Stage folders carry host and pid: only this host's dead processes are cleaned up (NFS homes are shared).
HOST = re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:32] or "host"
_STAGE = re.compile(r"^\.(?P<name>.+)\.moba-(?:tmp|old)-(?P<host>[A-Za-z0-9]+)-(?P<pid>\d+)-[A-Za-z0-9_]+$")
_FICLONE = 0x40049409  # linux/fs.h: _IOW(0x94, 9, int)


@dataclass
class CopyCounts:
    """How the files of SRC reached DST."""

    cloned: int = 0
    copied: int = 0
    linked: int = 0
    skipped: list[str] = field(default_factory=list)  # hidden entries of SRC (.git, .cache, ...)


# --------------------------------------------------------------------------------------------- SRC files


def source_files(src: Path, exclude: tuple[str, ...] = ()) -> tuple[list[tuple[Path, Path]], list[str]]:
    """``([(relative path, real file), ...], skipped)`` for every file under ``src``, symlinks resolved.

    Symlinked folders are followed; a symlink loop, a dangling link or a special file is one
    :class:`MobaError`. Hidden entries (``.git``, ``.cache``) are skipped and returned by name; top-level
    names in ``exclude`` are left out silently (the caller writes its own).
    """
    out: list[tuple[Path, Path]] = []
    skipped: list[str] = []
    seen: dict[str, Path] = {}

    def unreadable(e: OSError) -> None:
        raise MobaError(f"cannot read SRC folder {e.filename}: {e.strerror or e}")

    for root, dirs, files in os.walk(src, followlinks=True, onerror=unreadable):
        rel = Path(root).relative_to(src)
        real = os.path.realpath(root)
        if real in seen:
            raise MobaError(
                f"SRC folder {src / rel} is a symlink to {real}, which is already copied as "
                f"{src / seen[real]} (a symlink loop?); remove the link or copy SRC without it"
            )
        seen[real] = rel
        skipped.extend(str(rel / d) for d in dirs if d.startswith("."))
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if name.startswith("."):
                skipped.append(str(rel / name))
                continue
            if rel == Path(".") and name in exclude:
                continue
            path = Path(root) / name
            target = path.resolve()
            if not target.exists():
                raise MobaError(
                    f"SRC file {path} is a dangling symlink (to {os.readlink(path)}); is the download complete?"
                )
            if not target.is_file():
                raise MobaError(f"SRC entry {path} is not a regular file")
            out.append((rel / name, target))
    return out, skipped


# --------------------------------------------------------------------------------------------- copies


def is_weight_file(name: str) -> bool:
    return name.endswith(WEIGHT_SUFFIXES)


def clone_file(src: Path, dst: Path) -> str:
    """Copy ``src`` to a new file ``dst``: a reflink where the filesystem has them. Returns ``"cloned"``
    or ``"copied"``. ``dst`` gets the user's umask, not ``src``'s mode (a read-only cache blob must not make
    DST read-only)."""
    with open(src, "rb") as fi, open(dst, "xb") as fo:
        if _reflink(fi.fileno(), fo.fileno()):
            return "cloned"
        _copy_bytes(fi, fo)
    return "copied"


def _reflink(fd_in: int, fd_out: int) -> bool:
    if not sys.platform.startswith("linux"):
        return False
    import fcntl

    try:
        fcntl.ioctl(fd_out, _FICLONE, fd_in)
    except OSError:  # EOPNOTSUPP (ext4, tmpfs), EXDEV (other filesystem), EINVAL, ...
        return False
    return True


def _copy_bytes(fi: Any, fo: Any) -> None:
    """In-kernel copy (``copy_file_range``, which NFS and XFS may turn into a server-side copy or clone),
    else a plain read/write loop."""
    copy_range = getattr(os, "copy_file_range", None)
    if copy_range is not None:
        try:
            while copy_range(fi.fileno(), fo.fileno(), 1 << 30):
                pass
            return
        except OSError as e:
            if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EPERM):
                raise
            fi.seek(0)
            fo.seek(0)
            fo.truncate()
    shutil.copyfileobj(fi, fo, 16 << 20)


def populate(files: list[tuple[Path, Path]], dst: Path, *, link: bool = False) -> CopyCounts:
    """Put every ``(relative path, real file)`` into ``dst``; ``link``: hard-link weight files (SRC and DST
    then share them), copying where the filesystems differ."""
    counts = CopyCounts()
    for rel, real in files:
        target = dst / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if link and is_weight_file(rel.name):
            try:
                os.link(real, target)
                counts.linked += 1
                continue
            except OSError:  # another filesystem, or links not allowed: an independent copy instead
                pass
        if clone_file(real, target) == "cloned":
            counts.cloned += 1
        else:
            counts.copied += 1
    return counts


# --------------------------------------------------------------------------------------------- DST


def current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def make_stage(dst: Path) -> Path:
    """Create the hidden sibling of ``dst`` where the checkpoint is built, with the user's umask
    (``mkdtemp`` makes 0700, which the final rename would give DST)."""
    stage = Path(tempfile.mkdtemp(prefix=f".{dst.name}.moba-tmp-{HOST}-{os.getpid()}-", dir=dst.parent))
    os.chmod(stage, 0o777 & ~current_umask())
    return stage


def remove_stale_stages(parent: Path) -> list[str]:
    """Remove what killed runs left in ``parent``: stage and set-aside folders whose process is gone."""
    removed = []
    try:
        entries = list(parent.iterdir())
    except OSError:
        return removed
    for p in entries:
        m = _STAGE.match(p.name)
        if m is None or m.group("host") != HOST or p.is_symlink() or not p.is_dir():
            continue
        if _pid_alive(int(m.group("pid"))):
            continue
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p.name)
    return removed


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):  # another user's process, or we cannot tell: keep its folder
        return True
    return True


def write_marker(stage: Path) -> None:
    """Record every file now in ``stage`` (size and modification time) as written by ``moba convert``."""
    files = {}
    for root, _, names in os.walk(stage):
        for name in names:
            p = Path(root) / name
            st = p.stat()
            files[str(p.relative_to(stage))] = [st.st_size, st.st_mtime_ns]
    (stage / MARKER).write_text(json.dumps({"version": 1, "files": files}, indent=1, sort_keys=True) + "\n")


def check_replaceable(dst: Path, force: bool) -> None:
    """Raise unless ``dst`` is absent, or ``force`` is set and ``dst`` is an empty folder or an unchanged
    ``moba convert`` output."""
    if not (dst.exists() or dst.is_symlink()):
        return
    if not force:
        raise MobaError(f"DST {dst} already exists (use --force to replace a folder that moba convert wrote)")
    if dst.is_symlink() or not dst.is_dir():
        kind = "a symlink" if dst.is_symlink() else "a file"
        raise MobaError(f"DST {dst} is {kind}; --force only replaces a folder that moba convert wrote")
    if not any(dst.iterdir()):
        return
    try:
        recorded = json.loads((dst / MARKER).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        raise MobaError(
            f"DST {dst} was not written by moba convert (no {MARKER} record); --force replaces only such "
            "folders: choose another DST or remove it yourself"
        ) from None
    for root, dirs, names in os.walk(dst):
        for name in dirs + names:
            p = Path(root) / name
            rel = str(p.relative_to(dst))
            if p.is_dir() and not p.is_symlink():
                continue
            if rel == MARKER:
                continue
            if p.is_symlink():
                raise MobaError(f"DST {dst} holds the link {rel}, which moba convert did not write; remove it first")
            st = p.stat()
            if rel not in recorded:
                raise MobaError(f"DST {dst} holds {rel}, which moba convert did not write; --force would lose it")
            if [st.st_size, st.st_mtime_ns] != recorded[rel]:
                raise MobaError(f"DST {dst} has {rel} changed since moba convert wrote it; --force would lose it")


def move_into_place(stage: Path, dst: Path, force: bool) -> None:
    """Rename the finished ``stage`` to ``dst``; a replaceable ``dst`` is set aside first, then removed."""
    check_replaceable(dst, force)  # again: DST may have appeared or changed while we worked
    if not (dst.exists() or dst.is_symlink()):
        stage.rename(dst)
        return
    aside = Path(tempfile.mkdtemp(prefix=f".{dst.name}.moba-old-{HOST}-{os.getpid()}-", dir=dst.parent))
    aside.rmdir()
    dst.rename(aside)
    stage.rename(dst)
    shutil.rmtree(aside, ignore_errors=True)


# --------------------------------------------------------------------------------------------- signals


class _Terminated(BaseException):
    def __init__(self, signum: int) -> None:
        super().__init__(f"signal {signum}")
        self.signum = signum


@contextlib.contextmanager
def signals_as_exceptions() -> Iterator[None]:
    """Inside the block SIGTERM and SIGHUP raise, so ``except``/``finally`` clean-up runs; on leaving, the
    signal is delivered again under the old handler (the process still ends the way the sender meant)."""
    main = threading.current_thread() is threading.main_thread()
    sigs = [getattr(signal, n) for n in ("SIGTERM", "SIGHUP") if main and hasattr(signal, n)]
    # A signal the user ignores (nohup) stays ignored; one set from C code (None) is left alone.
    sigs = [s for s in sigs if signal.getsignal(s) not in (signal.SIG_IGN, None)]
    if not sigs:
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        for s in sigs:  # no second signal in the middle of the clean-up
            signal.signal(s, signal.SIG_IGN)
        raise _Terminated(signum)

    old = {s: signal.signal(s, handler) for s in sigs}
    try:
        yield
    except _Terminated as e:
        for s, h in old.items():
            signal.signal(s, h)
        signal.raise_signal(e.signum)
        raise MobaError(f"stopped by signal {e.signum}") from None  # only when the old handler returns
    finally:
        for s, h in old.items():
            signal.signal(s, h)
