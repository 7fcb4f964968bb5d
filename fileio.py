"""Every file this project writes or unpickles goes through here.

Three promises (see docs/reliability.md):
- a write is atomic: a kill at any moment leaves the old file or the new one, never half of one;
- a written file gets the mode a plain open() gives (0666 less the umask), or keeps the mode of
  the file it replaces; a write the user can fix (full disk, quota, read-only, permissions) ends
  in one UserError line naming the file, its folder and the bytes needed;
- loading a pickle never runs code: only numpy arrays, dtypes and plain containers are admitted.
"""
import contextlib
import errno
import os
import pickle
import shutil
import socket
import stat
import tempfile

from errors import UserError


# Write errors the user can fix; anything else (EIO, a bug) keeps its traceback.
SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
WRITE_ERRNOS = SPACE_ERRNOS | {errno.EROFS, errno.EACCES, errno.EPERM}


def write_error(path, error, size=None, replacing=False):
    """The one-line UserError for an OSError `error` of writing `path`, or None if the user cannot fix it.

    `size`: the bytes the file needs (an int, or a callable computing it, asked only for a full disk);
    `replacing`: an atomic write, which leaves the previous file as it was."""
    if not isinstance(error, OSError) or error.errno not in WRITE_ERRNOS:
        return None
    folder = os.path.dirname(os.path.abspath(path))
    facts = []
    if error.errno in SPACE_ERRNOS:
        needed = size() if callable(size) else size
        if needed is not None:
            facts.append(f"it needs {needed} bytes")
        with contextlib.suppress(OSError):
            st = os.statvfs(folder)
            facts.append(f"{st.f_bavail * st.f_frsize} bytes are free")
    detail = f" ({', '.join(facts)})" if facts else ''
    kept = f"; the previous {os.path.basename(path)} is unchanged" if replacing and os.path.exists(path) else ''
    return UserError(f"cannot write {os.path.basename(path)} into folder {folder}: "
                     f"{error.strerror or os.strerror(error.errno)}{detail}{kept}")


@contextlib.contextmanager
def user_write_errors(path, size=None, replacing=False):
    """Inside, an OSError of writing `path` that the user can fix becomes write_error's UserError."""
    try:
        yield
    except OSError as e:
        error = write_error(path, e, size, replacing)
        if error is None:
            raise
        raise error from None


@contextlib.contextmanager
def atomic_path(path, size=None):
    """Yield a temporary path next to `path`; on success fsync it and rename it over `path`.

    The temporary file lives in the same folder so that `os.replace` is a rename on one file
    system (atomic on POSIX), not a copy. Its name carries the writer's host and pid: a writer
    killed mid-write (SIGKILL cannot be caught) leaves it behind, and the next write of `path`
    removes it once that process is gone. mkstemp creates it 0600; before the rename it gets the
    mode of the file it replaces, else open()'s. A write error the user can fix (see write_error;
    `size` as there) removes the temporary and leaves `path` as it was.
    """
    folder = os.path.dirname(os.path.abspath(path))
    _remove_stale_temporaries(folder, os.path.basename(path))
    prefix = f".{os.path.basename(path)}.{socket.gethostname()}.{os.getpid()}."
    try:
        fd, tmp = tempfile.mkstemp(prefix=prefix, suffix='.tmp', dir=folder)
    except OSError as e:
        error = write_error(path, e, replacing=True)
        raise error or UserError(f"cannot write into folder {folder}: {e.strerror}") from None
    os.close(fd)
    with user_write_errors(path, size, replacing=True):
        try:
            yield tmp
            with open(tmp, 'rb+') as f:
                os.fsync(f.fileno())
            os.chmod(tmp, _mode_for(path))
            os.replace(tmp, path)
        finally:
            # Also before a write error's message is made, so that it counts the temporary's space as free.
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
    _fsync_dir(folder)


def _mode_for(path):
    """The permission bits of the file at `path` if there is one, else those open() would give a new one."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        return 0o666 & ~umask()


def umask():
    """The process's umask, read without changing it (Linux); elsewhere set and put back at once."""
    try:
        with open('/proc/self/status') as f:
            for line in f:
                if line.startswith('Umask:'):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _remove_stale_temporaries(folder, base):
    """Delete `.<base>.<host>.<pid>.<random>.tmp` files (atomic_path's) whose writer no longer runs."""
    lead = f".{base}."
    try:
        names = os.listdir(folder)
    except OSError:
        return  # mkstemp will explain
    for name in names:
        if not (name.startswith(lead) and name.endswith('.tmp')):
            continue
        parts = name[len(lead):-len('.tmp')].rsplit('.', 2)  # host (may hold dots), pid, random
        if len(parts) != 3 or not parts[1].isdigit() or RunLock._alive((parts[0], int(parts[1]))):
            continue
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(folder, name))


def _fsync_dir(folder):
    # Makes the rename itself durable; not every file system allows opening a folder.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path, data):
    with atomic_path(path, size=len(data)) as tmp:
        with open(tmp, 'wb') as f:
            f.write(data)


def atomic_copy(src, dst):
    with atomic_path(dst, size=os.path.getsize(src)) as tmp:
        shutil.copyfile(src, tmp)


def atomic_write_text(path, text):
    atomic_write_bytes(path, text.encode('utf-8'))


def atomic_pickle_dump(obj, path):
    # Protocol 4 keeps the files readable by the original code's Python 3 environments.
    atomic_write_bytes(path, pickle.dumps(obj, protocol=4))


# Globals a pickle of numpy arrays and plain containers needs, under numpy 1.x and 2.x names.
_SAFE_GLOBALS = {
    ('collections', 'OrderedDict'),
    ('builtins', 'set'), ('builtins', 'frozenset'), ('builtins', 'slice'), ('builtins', 'complex'),
    ('numpy', 'ndarray'), ('numpy', 'dtype'),
}
for _core in ('numpy.core', 'numpy._core'):
    _SAFE_GLOBALS |= {(_core + '.multiarray', '_reconstruct'), (_core + '.multiarray', 'scalar'),
                      (_core + '.numeric', '_frombuffer')}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in _SAFE_GLOBALS:
            return super().find_class(module, name)
        if module == 'numpy' and name.endswith('DType') or module == 'numpy.dtypes':
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def safe_pickle_load(path, what='pickle file', hint=''):
    """Load a pickle that may only hold numpy arrays and plain containers.

    `what` and `hint` make the one-line error useful, e.g. what='TinyImages selection',
    hint='pass --unlabeled_data to point elsewhere'.
    """
    hint = f" ({hint})" if hint else ''
    if not os.path.isfile(path):
        raise UserError(f"{what} not found: {path}{hint}")
    # Unpickled straight from the file: reading it into memory first made the 1.5 GB TinyImages selection take
    # 5-8 s instead of 0.9 s (and twice its size in memory).
    with open(path, 'rb') as f:
        try:
            try:
                return _RestrictedUnpickler(f, encoding='ASCII').load()
            except UnicodeDecodeError:
                # Python 2 pickles (CIFAR batches, old TinyImages selections) hold byte strings.
                f.seek(0)
                return _RestrictedUnpickler(f, encoding='latin1').load()
        except pickle.UnpicklingError as e:
            if 'refusing to load' in str(e):
                raise UserError(f"{what} {path} contains code or objects other than arrays "
                                f"({str(e).replace('refusing to load ', '')}); refusing to load it") from None
            raise UserError(f"{what} {path} is corrupt or not a pickle: {e}") from None
        except (EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError) as e:
            raise UserError(f"{what} {path} is corrupt or truncated ({type(e).__name__}: {e})") from None


class RunLock:
    """An exclusive lock on a run folder, so two runs never write the same checkpoints.

    The lock file holds `host pid`. A lock left by a process that no longer exists on this host
    (a crash, SIGKILL) is taken over; a live one makes the second run refuse.
    """

    def __init__(self, folder):
        self.path = os.path.join(folder, '.lock')
        self.held = False

    def acquire(self):
        me = f"{socket.gethostname()} {os.getpid()}"
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self._owner()
                if owner is not None and self._alive(owner):
                    raise UserError(f"another run (process {owner[1]} on {owner[0]}) is writing "
                                    f"{os.path.dirname(self.path)}; wait for it or use another --exp_str")
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.path)
                continue
            except OSError as e:
                raise UserError(f"cannot write into folder {os.path.dirname(self.path)}: {e.strerror}") from None
            with os.fdopen(fd, 'w') as f:
                f.write(me)
            self.held = True
            return self
        raise UserError(f"could not lock {self.path}; remove it if no run is using that folder")

    def _owner(self):
        try:
            with open(self.path) as f:
                host, pid = f.read().split()
            return host, int(pid)
        except (OSError, ValueError):
            return None

    @staticmethod
    def _alive(owner):
        host, pid = owner
        if host != socket.gethostname():
            return True  # cannot check another host's processes: assume it is alive
        try:
            os.kill(pid, 0)
        except OSError as e:
            return e.errno == errno.EPERM
        return True

    def release(self):
        if self.held:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
            self.held = False

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
