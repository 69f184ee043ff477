"""Directory trees a notebook made: their size, and removing them, whatever their shape.

A work directory is the student's: it can be a few thousand levels deep, hold a million
files, contain links to anything, or directories without permissions.  ``shutil.rmtree``
recurses once per level (a ``RecursionError`` a few thousand levels down) and builds full
paths (longer than ``PATH_MAX`` well before that).  The walk here is iterative and works
relative to one open directory at a time (``openat``), going back up through ``..``, so
neither the depth nor the path length matters and it holds at most two descriptors.  It
never follows a symbolic link.

Imported inside the sandbox too (the runner measures the work directory): standard library
only.
"""

from __future__ import annotations

import os
import stat

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)


def _open_dir(name: str, dir_fd: int | None) -> int:
    try:
        return os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
    except PermissionError:
        # a directory the notebook made unreadable: it is ours to open again
        os.chmod(name, 0o700, dir_fd=dir_fd)
        return os.open(name, _DIR_FLAGS, dir_fd=dir_fd)


def _writable(fd: int) -> None:
    """Give the owner back the rights to empty a directory the notebook locked."""
    try:
        mode = os.fstat(fd).st_mode
        if mode & 0o700 != 0o700:
            os.fchmod(fd, stat.S_IMODE(mode) | 0o700)
    except OSError:
        pass


def _entries(fd: int) -> tuple[list[str], list[tuple[str, int]]]:
    """(subdirectories, [(other entry, bytes it occupies)]) of the open directory."""
    dirs, others = [], []
    with os.scandir(os.dup(fd)) as it:  # scandir closes the descriptor it is given
        for entry in it:
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                others.append((entry.name, 0))
                continue
            if stat.S_ISDIR(st.st_mode):
                dirs.append(entry.name)
            else:
                others.append((entry.name, st.st_blocks * 512 if st.st_nlink <= 1
                               else st.st_blocks * 512 // st.st_nlink))
    return dirs, others


def _walk(root: str, remove: bool, limit_entries: int | None = None
          ) -> tuple[int, int, list[str]]:
    """Post-order walk of ``root``; returns (bytes, entries, problems)."""
    problems: list[str] = []
    total = count = 0
    try:
        fd = _open_dir(root, None)
    except FileNotFoundError:
        return 0, 0, []
    except OSError as e:
        return 0, 0, [f"{root}: {e.strerror or e}"]
    # the names still to visit at each level above the current directory, and the name
    # of each directory on the way down (to remove it once it is empty)
    pending: list[list[str]] = []
    names: list[str] = []
    try:
        while True:
            if remove:
                _writable(fd)
            try:
                dirs, others = _entries(fd)
            except OSError as e:
                problems.append(f"{'/'.join(names) or '.'}: {e.strerror or e}")
                dirs, others = [], []
            for name, size in others:
                total += size
                count += 1
                if remove:
                    try:
                        os.unlink(name, dir_fd=fd)
                    except FileNotFoundError:
                        pass
                    except OSError as e:
                        problems.append(f"{name}: {e.strerror or e}")
            count += len(dirs)
            if limit_entries is not None and count > limit_entries:
                return total, count, problems
            pending.append(dirs)
            # descend into the next subdirectory, or climb while a level is done
            while True:
                todo = pending[-1]
                if todo:
                    name = todo.pop()
                    try:
                        child = _open_dir(name, fd)
                    except OSError as e:
                        problems.append(f"{name}: {e.strerror or e}")
                        continue
                    os.close(fd)
                    fd = child
                    names.append(name)
                    break
                pending.pop()
                if not names:
                    return total, count, problems
                parent = os.open("..", _DIR_FLAGS, dir_fd=fd)
                os.close(fd)
                fd = parent
                done = names.pop()
                if remove:
                    try:
                        os.rmdir(done, dir_fd=fd)
                    except FileNotFoundError:
                        pass
                    except OSError as e:
                        problems.append(f"{done}: {e.strerror or e}")
    finally:
        os.close(fd)


def tree_size(root: str, limit_entries: int | None = None) -> int:
    """Bytes of disk the files under ``root`` occupy (stops counting after
    ``limit_entries`` entries)."""
    return _walk(root, remove=False, limit_entries=limit_entries)[0]


def remove_tree(root: str) -> list[str]:
    """Remove ``root`` and everything under it; never raises.  Returns what could not be
    removed (empty when all is gone)."""
    try:
        st = os.lstat(root)
    except FileNotFoundError:
        return []
    except OSError as e:
        return [f"{root}: {e.strerror or e}"]
    if not stat.S_ISDIR(st.st_mode):
        try:
            os.unlink(root)
            return []
        except OSError as e:
            return [f"{root}: {e.strerror or e}"]
    try:
        _, _, problems = _walk(root, remove=True)
    except OSError as e:  # e.g. out of descriptors
        problems = [f"{root}: {e.strerror or e}"]
    try:
        os.rmdir(root)
    except FileNotFoundError:
        pass
    except OSError as e:
        problems.append(f"{root}: {e.strerror or e}")
    return problems
