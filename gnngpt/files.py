"""Files written atomically: a crash at any point leaves the old file or the new one, never a mix."""
import contextlib
import errno
import fnmatch
import os
import re
import secrets
import tempfile
from pathlib import Path

# what atomic_writes puts beside a path for a while: the new file (mkstemp's 8 characters), a link to the old one
LEFTOVER = re.compile(r"\.(?P<name>.+)\.([a-z0-9_]{8}\.tmp|[0-9a-f]{16}\.old)")


def atomic_name_length(name):
    """The length in bytes of the longest name that atomic_writes gives a file beside one called name: the link to
    the old file, .<name>.<16 hex digits>.old (LEFTOVER), longer than the new file's."""
    return len(os.fsencode(f".{name}.")) + 16 + len(".old")


def atomic_write(path, write):
    """Call write(file) on a temporary file beside path, fsync it, then rename it over path (over the file a
    symlink at path points to, so that the link stays)."""
    atomic_writes([(path, write)])


def atomic_writes(writes):
    """atomic_write of each (path, write) of writes, all or none: every temporary file is written first, and only
    then renamed over its path, so that a failed write (a full disk, say) changes none of the paths; a directory
    in a path's place is refused before anything is written. A rename needs no space, but may be refused (an
    immutable file, another user's in a sticky directory): the paths renamed before it get their old files back,
    from hard links made beforehand (where the file system has none, the new file stays), or are removed where
    they were new. Directories made for them are removed again. An OSError carries the path it failed on as its
    target."""
    targets = [Path(path).resolve() if Path(path).is_symlink() else Path(path) for path, _ in writes]
    temporary, created = [], []
    path, renamed = None, False
    try:
        for path, (_, write) in zip(targets, writes):
            if path.is_dir():
                raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
            make_directories(path.parent, created)
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            temporary.append(tmp)
            os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes it private; give it a new file's usual mode
            with os.fdopen(fd, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
        with restorable(targets) as renaming:
            for tmp, path in zip(temporary, targets):
                os.replace(tmp, path)
                renaming.append(path)
        renamed = True
        for directory in dict.fromkeys(path.parent for path in targets):
            fsync_dir(directory)
    except OSError as e:
        e.target = path
        raise
    finally:
        for tmp in temporary:
            if os.path.exists(tmp):
                os.remove(tmp)
        if not renamed:
            for directory in sorted(created, key=lambda d: len(d.parts), reverse=True):
                with contextlib.suppress(OSError):  # left where something else has been put in it since
                    directory.rmdir()


@contextlib.contextmanager
def restorable(paths):
    """Yield a list to append each of paths to once it is replaced; should the block raise, each one appended gets
    its old file back (from a hard link made before) or, where it had none, is removed."""
    old = {path: old_link(path) for path in dict.fromkeys(paths) if path.exists()}
    replaced = []
    try:
        yield replaced
    except OSError:
        for path in replaced:
            with contextlib.suppress(OSError):  # the first error is the one to report
                if path not in old:
                    path.unlink()
                elif old[path]:
                    os.replace(old[path], path)
        raise
    finally:
        for link in filter(None, old.values()):
            with contextlib.suppress(OSError):
                os.remove(link)


def old_link(path):
    """A new hard link to path's file beside it, or None where the file system makes none or the file is another
    user's (in a sticky directory, a link to it could not be removed again)."""
    if hasattr(os, "getuid") and path.stat().st_uid != os.getuid():
        return None
    link = path.parent / f".{path.name}.{secrets.token_hex(8)}.old"
    try:
        os.link(path, link)
    except OSError:
        return None
    return link


def remove_leftovers(directory, names):
    """Remove the temporary files and links to old files that atomic_writes leaves in directory when its process
    is killed midway (SIGKILL skips its clean-up), for the files whose names match one of the glob patterns names:
    for files whose writer is this process alone. A directory that does not exist has none."""
    if not Path(directory).is_dir():
        return
    for path in Path(directory).iterdir():
        leftover = LEFTOVER.fullmatch(path.name)
        if leftover and any(fnmatch.fnmatchcase(leftover["name"], pattern) for pattern in names) and \
                path.is_file() and not path.is_symlink():
            with contextlib.suppress(OSError):  # one that cannot go stays, as before
                path.unlink()


def make_directories(directory, made):
    """Make directory and those above it that do not exist, as mkdir -p, each added to made as it is made (not
    those another process made meanwhile), so that made lists them when a deeper one fails."""
    missing = []
    while not directory.exists() and directory != directory.parent:
        missing.append(directory)
        directory = directory.parent
    for directory in reversed(missing):
        try:
            directory.mkdir()
        except FileExistsError:
            if not directory.is_dir():
                raise
        else:
            made.append(directory)


def first_missing(path):
    """The outermost of path (an absolute path) and the directories above it that does not exist, the first that
    mkdir -p would make; None when path exists."""
    return next((d for d in [*reversed(path.parents), path] if not d.exists()), None)


def atomic_write_text(path, text):
    """Write text as UTF-8 to path atomically."""
    atomic_write(path, utf8(text))


def utf8(text):
    """A write (see atomic_write) of text as UTF-8."""
    return lambda f: f.write(text.encode("utf-8"))


def current_umask():
    umask = os.umask(0)
    os.umask(umask)
    return umask


def fsync_dir(path):
    """Make a rename in directory path durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


DISK_FULL = (errno.ENOSPC, errno.EDQUOT)  # the errno codes of a full disk, or a full quota


def write_failure(path, error, place="the run directory"):
    """"could not write PATH (REASON); FIX" for an OSError of a write of path in place (see write_fix)."""
    return f"could not write {path} ({error.strerror or error}); {write_fix(error, place)}"


def write_fix(error, place="the run directory"):
    """What to do about an OSError of a write in place: free disk space when the disk or quota is full, remove
    the directory where the file goes, else make place writable (the directory, where the file is written
    atomically beside it)."""
    if error.errno in DISK_FULL:
        return "free disk space"
    if error.errno == errno.EISDIR:
        return "remove the directory in the file's place"
    return f"make {place} writable"
