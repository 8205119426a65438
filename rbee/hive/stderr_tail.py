"""Where a worker's stderr goes, so that the hive can show its last lines when it fails.

With ``log_dir`` the worker writes stdout and stderr to its log file as before, and the tail is
read from that file. Without it, stderr goes to an unnamed file (``O_TMPFILE`` in the temporary
directory: nothing to clean up, gone when the worker and the hive have both closed it) that the
hive keeps open. A file, not a pipe: the worker never blocks on the hive, and a worker the hive
leaves running over its own restart does not die of SIGPIPE on its next line (the next hive
finds the file again through ``/proc/<pid>/fd/2``). The file is opened ``O_APPEND`` and cut back
to nothing when it passes ``MAX_BYTES``, so a chatty worker cannot fill the disk.
"""

from __future__ import annotations

import fcntl
import os
import stat
import tempfile

from ..contract import MAX_TAIL_LINES, TAIL_BYTES, TAIL_LINE_CHARS, cut

MAX_BYTES = 4 * 2**20
"""An unnamed stderr file past this is emptied (checked at each collection tick)."""
READ_BYTES = 8192
"""Bytes read from the file's end for its last lines."""


class OutputTail:
    """A read handle on the file a worker's stderr goes to."""

    __slots__ = ("fd", "owned")

    def __init__(self, fd: int, owned: bool) -> None:
        self.fd = fd
        self.owned = owned
        """True for the unnamed file the hive made (the hive trims it); False for a log file."""

    @classmethod
    def unnamed(cls) -> OutputTail:
        """A new unnamed file for a worker's stderr; pass ``fd`` to the child as its stderr."""
        flags = os.O_RDWR | os.O_APPEND | os.O_CLOEXEC
        try:
            fd = os.open(tempfile.gettempdir(), flags | os.O_TMPFILE, 0o600)
        except (AttributeError, OSError):  # no O_TMPFILE here: a named file, unlinked at once
            fd, path = tempfile.mkstemp(prefix="rbee-stderr-")
            os.unlink(path)
            fcntl.fcntl(fd, fcntl.F_SETFL, os.O_APPEND)
        return cls(fd, owned=True)

    @classmethod
    def of_file(cls, path: str) -> OutputTail | None:
        try:
            return cls(os.open(path, os.O_RDONLY | os.O_CLOEXEC), owned=False)
        except OSError:
            return None

    @classmethod
    def of_process(cls, pid: int) -> OutputTail | None:
        """The regular file a running process's stderr goes to (a re-adopted worker's), if any:
        an unnamed one (an earlier hive's) is opened for writing too, so that it is trimmed."""
        path = f"/proc/{pid}/fd/2"
        try:
            info = os.stat(path)
            if not stat.S_ISREG(info.st_mode):
                return None
            unnamed = info.st_nlink == 0
            return cls(os.open(path, (os.O_RDWR if unnamed else os.O_RDONLY) | os.O_CLOEXEC),
                       owned=unnamed)
        except OSError:
            return None

    def lines(self) -> list[str]:
        """The last lines (at most ``MAX_TAIL_LINES``, each cut to ``TAIL_LINE_CHARS``, all
        together at most ``TAIL_BYTES`` in UTF-8), oldest first; blank lines left out."""
        try:
            size = os.fstat(self.fd).st_size
            data = os.pread(self.fd, READ_BYTES, max(0, size - READ_BYTES))
        except OSError:
            return []
        text = data.decode(errors="replace").splitlines()
        if size > READ_BYTES and text:
            text = text[1:]  # the first is most likely cut
        tail: list[str] = []
        total = 0
        for line in reversed(text):
            line = cut(line.rstrip(), TAIL_LINE_CHARS)
            if not line:
                continue
            size = len(line.encode())
            if len(tail) == MAX_TAIL_LINES or total + size > TAIL_BYTES:
                break
            tail.append(line)
            total += size
        return tail[::-1]

    def trim(self) -> None:
        """Empty an unnamed file past ``MAX_BYTES`` (the worker appends, so it goes on at 0)."""
        if self.owned:
            try:
                if os.fstat(self.fd).st_size > MAX_BYTES:
                    os.ftruncate(self.fd, 0)
            except OSError:
                pass

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
