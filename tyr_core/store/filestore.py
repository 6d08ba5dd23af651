"""``FileStore``: a store in a local folder, for ``file://`` URLs. Writes are atomic (fsynced temp file, rename) and
the conditional create is a hard link, so readers never see a partial object."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import secrets
import stat
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from ..errors import ArtefactError, MissingArtefactError, StoreError
from .protocol import CHUNK_BYTES, TEMP_PREFIX, WriteGuard, check_key, check_prefix

OBJECT_MODE = 0o640  # artefacts are the owner's to write, the group's to read, nobody else's


def _fsync_dir(folder: Path) -> None:
    """Make a rename, link or unlink in ``folder`` durable (the entry lives in the directory, not the file)."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _open_temp_beside(final: Path) -> tuple[int, Path]:
    """Create an empty temp file in ``final``'s folder (mode ``OBJECT_MODE`` less the umask: never world-readable)."""
    for _ in range(3):  # the folder can vanish between mkdir and open when a GC tidies empty folders
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.parent / f"{TEMP_PREFIX}{final.name}.{secrets.token_hex(6)}"
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, OBJECT_MODE), tmp
        except FileNotFoundError:
            continue
    raise OSError(errno.ENOENT, "the folder kept disappearing", str(final.parent))


def _write_temp_beside(final: Path, fill: Callable[[BinaryIO], None]) -> Path:
    """Write a fsynced temp file next to ``final`` with ``fill``; on any error the temp file is removed.

    Raises:
        OSError: from the filesystem (a full disk, permissions); nothing is left behind.
    """
    fd, tmp = _open_temp_beside(final)
    try:
        with os.fdopen(fd, "wb") as f:
            fill(f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    return tmp


def _copy_from(path: Path) -> Callable[[BinaryIO], None]:
    def fill(dst: BinaryIO) -> None:
        with open(path, "rb") as src:
            while chunk := src.read(CHUNK_BYTES):
                dst.write(chunk)

    return fill


def write_advice(err: OSError) -> str:
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return "the disk is full: free space or point the store elsewhere, then resume"
    if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return "the folder is not writable: fix its permissions or point the store elsewhere"
    return "check the disk and the folder, then resume"


def _is_not_found(err: OSError) -> bool:
    return isinstance(err, FileNotFoundError | IsADirectoryError | NotADirectoryError)


class FileStore:
    """A store in a local folder: atomic writes (temp file + rename, fsynced), conditional create by hard link.

    A failed write (full disk, permissions) raises ``StoreError`` naming the key, removes its temp file and
    leaves any object already committed at that key untouched. Symbolic links inside the store are refused: a key
    is never read, written, listed or deleted through one, so nothing (GC included) can reach outside the root.
    ``write_guard``, when set, is called with the key before every write or delete (the run lock uses it).
    """

    write_guard: WriteGuard | None = None

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().resolve()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise StoreError(
                f"cannot create the store folder {self.root}: {err.strerror}; check the path and its permissions"
            ) from err

    def scoped(self, sub: str) -> FileStore:
        """The store in the folder ``sub`` below the root (``sub`` is validated like a key); refuses a ``sub`` that
        goes through a symbolic link, which would take the scoped store's writes and GC outside this one."""
        self._path(sub.strip("/"))
        return FileStore(self.root / sub.strip("/"))

    @property
    def url(self) -> str:
        return self.root.as_uri()

    def __repr__(self) -> str:
        return f"FileStore({str(self.root)!r})"

    def _path(self, key: str) -> Path:
        """The file of ``key``; refuses a key whose path goes through a symbolic link (below the root)."""
        path = self.root / check_key(key)
        at = self.root
        for part in key.split("/"):
            at = at / part
            if at.is_symlink():
                raise StoreError(
                    f"{key!r} in {self.url} goes through the symbolic link {at}: the store refuses links (they could "
                    "reach outside it); replace the link with the folder or file itself"
                )
        return path

    def _guard(self, key: str) -> None:
        if self.write_guard is not None:
            self.write_guard(key)

    def _write_failed(self, key: str, err: OSError) -> StoreError:
        return StoreError(f"could not write {key!r} to {self.url}: {err.strerror or err}; {write_advice(err)}")

    def _stage(self, key: str, fill: Callable[[BinaryIO], None]) -> Path:
        try:
            return _write_temp_beside(self._path(key), fill)
        except OSError as err:
            raise self._write_failed(key, err) from err

    def _publish(self, key: str, tmp: Path) -> None:
        final = self._path(key)
        try:
            os.replace(tmp, final)
            _fsync_dir(final.parent)
        except OSError as err:
            tmp.unlink(missing_ok=True)
            raise self._write_failed(key, err) from err

    def put_bytes(self, key: str, data: bytes) -> None:
        self._guard(key)
        self._publish(key, self._stage(key, lambda f: f.write(data)))

    def put_file(self, key: str, path: Path) -> None:
        self._guard(key)
        path = Path(path)
        if not path.is_file():
            raise StoreError(f"cannot store {key!r}: the local file {path} does not exist")
        self._publish(key, self._stage(key, _copy_from(path)))

    def put_if_absent(self, key: str, data: bytes) -> bool:
        self._guard(key)
        final = self._path(key)
        tmp = self._stage(key, lambda f: f.write(data))
        try:
            os.link(tmp, final)  # atomic, and fails if the key exists: readers never see a partial object
        except FileExistsError:
            return False
        except OSError as err:
            if err.errno in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
                return self._create_exclusive(key, data)  # filesystems without hard links
            raise self._write_failed(key, err) from err
        finally:
            tmp.unlink(missing_ok=True)
        try:
            _fsync_dir(final.parent)
        except OSError as err:
            raise self._write_failed(key, err) from err
        return True

    def _create_exclusive(self, key: str, data: bytes) -> bool:
        final = self._path(key)
        try:
            fd = os.open(final, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, OBJECT_MODE)
        except FileExistsError:
            return False
        except OSError as err:
            raise self._write_failed(key, err) from err
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                os.fsync(f.fileno())
        except OSError as err:
            final.unlink(missing_ok=True)  # never leave a partial object that blocks the next attempt
            raise self._write_failed(key, err) from err
        return True

    def get_bytes(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except OSError as err:
            raise self._read_failed(key, err) from None

    def get_file(self, key: str, path: Path) -> None:
        src, dest = self._path(key), Path(path)
        if not src.is_file():
            raise MissingArtefactError(f"{key!r} is not in {self.url}")
        try:
            tmp = _write_temp_beside(dest, _copy_from(src))
            os.replace(tmp, dest)
        except OSError as err:
            if _is_not_found(err) and not src.is_file():
                raise MissingArtefactError(f"{key!r} is not in {self.url}") from None
            raise StoreError(
                f"could not copy {key!r} from {self.url} to {dest}: {err.strerror or err}; {write_advice(err)}"
            ) from err

    def _read_failed(self, key: str, err: OSError) -> ArtefactError | StoreError:
        if _is_not_found(err):
            return MissingArtefactError(f"{key!r} is not in {self.url}")
        return StoreError(f"could not read {key!r} from {self.url}: {err.strerror or err}")

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def size(self, key: str) -> int:
        try:
            return self._path(key).stat().st_size
        except OSError as err:
            raise self._read_failed(key, err) from None

    def list(self, prefix: str = "") -> list[str]:
        """Keys under ``prefix``; symbolic links (to folders or files) are refused with ``StoreError``."""
        check_prefix(prefix)
        folder = prefix.rpartition("/")[0]  # the deepest folder that can hold matches
        if folder:
            self._path(folder)  # refuses a link on the way there
        start = self.root / folder
        if not start.is_dir():
            return []
        found: list[str] = []
        for at, subfolders, files in os.walk(start):  # os.walk does not follow links to folders: they come as names
            rel = Path(at).relative_to(self.root).as_posix()
            base = "" if rel == "." else rel + "/"
            for name in [*subfolders, *files]:
                if (Path(at) / name).is_symlink() and _may_hold(base + name + "/", prefix):
                    raise StoreError(
                        f"{self.url} holds the symbolic link {base + name!r}: the store refuses links (they could "
                        "reach outside it); replace it with the folder or file itself"
                    )
            subfolders[:] = [d for d in subfolders if _may_hold(base + d + "/", prefix)]
            found += [base + f for f in files if not f.startswith(TEMP_PREFIX) and (base + f).startswith(prefix)]
        return sorted(found)

    # ------------------------------------------------------------------------------ compare-and-swap (SwapStore)

    @contextlib.contextmanager
    def _swap_lock(self, key: str):
        """Serialises compare-and-swap on ``key`` between processes (an flock on a hidden file beside it)."""
        final = self._path(key)
        final.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(final.parent / f"{TEMP_PREFIX}swap-{final.name}", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield final
        finally:
            os.close(fd)

    def get_tagged(self, key: str) -> tuple[bytes, str]:
        data = self.get_bytes(key)
        return data, hashlib.sha256(data).hexdigest()

    def replace_if(self, key: str, data: bytes, tag: str) -> str | None:
        self._guard(key)
        with self._swap_lock(key) as final:
            try:
                current = final.read_bytes()
            except FileNotFoundError:
                return None
            if hashlib.sha256(current).hexdigest() != tag:
                return None
            self._publish(key, self._stage(key, lambda f: f.write(data)))
        return hashlib.sha256(data).hexdigest()

    def delete_if(self, key: str, tag: str) -> bool:
        self._guard(key)
        with self._swap_lock(key) as final:
            try:
                if hashlib.sha256(final.read_bytes()).hexdigest() != tag:
                    return False
            except FileNotFoundError:
                return False
            self.delete(key)
        return True

    def delete(self, key: str) -> None:
        self._guard(key)
        path = self._path(key)
        if stat.S_ISDIR(_lstat_mode(path)):
            return  # a folder is not an object: nothing to delete under that key
        try:
            path.unlink()
            _fsync_dir(path.parent)  # durable before the caller deletes the next key (GC: manifest, then object)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return  # no object under that key: deleting is idempotent
        except OSError as err:
            raise StoreError(f"could not delete {key!r} from {self.url}: {err.strerror or err}") from err
        self._remove_empty_folders(path.parent)

    def _remove_empty_folders(self, folder: Path) -> None:
        while folder != self.root and folder.is_relative_to(self.root):
            try:
                folder.rmdir()
            except OSError:  # not empty (or already gone): stop tidying
                return
            folder = folder.parent

    def check(self) -> None:
        """A cheap probe: the root is a writable folder."""
        if not self.root.is_dir() or not os.access(self.root, os.W_OK | os.X_OK):
            raise StoreError(f"the store folder {self.root} is not a writable folder; fix its permissions")


def _lstat_mode(path: Path) -> int:
    try:
        return path.lstat().st_mode
    except OSError:
        return 0


def _may_hold(folder: str, prefix: str) -> bool:
    """Whether keys under ``folder`` ('a/b/') can start with ``prefix``."""
    return folder.startswith(prefix) or prefix.startswith(folder)
