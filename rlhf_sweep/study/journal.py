"""Optuna journal files: checked before Optuna opens one, and repaired when only the end is torn.

A journal is append-only, one JSON record per line, each appended whole and then fsynced under
Optuna's lock; a crash or a full disk mid-append leaves a final line without its newline, which
Optuna's reader skips as not yet written. Appending after it would glue the next record onto the
cut line and make the journal unreadable for good, so a torn end stops every command before it
writes, and `rlhf-sweep repair` drops exactly that unterminated tail (what Optuna already ignored)
after keeping a backup copy. A line that is not a record anywhere before the end is damage this
module does not guess about: it is reported with its line number and the file is never written.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from optuna.storages.journal import JournalFileBackend, JournalFileSymlinkLock

from rlhf_sweep.run import layout
from rlhf_sweep.study.spec import StudyError


class JournalError(StudyError):
    """A journal file that cannot be used as it is; one line naming the file, the line and the fix."""


@dataclass
class Scan:
    path: Path
    size: int
    records: int  # complete records (lines that end with a newline and parse)
    lines: int
    studies: list[str]  # the study names the journal creates
    torn_at: int | None = None  # byte offset where an unterminated final line starts
    torn_line: int | None = None
    bad_line: int | None = None  # the first complete line that is not a record
    bad_why: str = ""

    @property
    def torn_bytes(self) -> int:
        return self.size - self.torn_at if self.torn_at is not None else 0


def is_journal(storage: str) -> bool:
    return "://" not in storage


@contextmanager
def locked(path: Path):
    """Optuna's own journal lock (the one appenders take), so a record being appended right now is
    not mistaken for a torn one. A folder that refuses the lock's link is read without it."""
    lock = JournalFileSymlinkLock(str(path))
    try:
        lock.acquire()
    except OSError:
        yield
        return
    try:
        yield
    finally:
        lock.release()


def ends_torn(path: str | Path) -> bool:
    """Whether the file's last byte is not a newline (an unterminated record at its end)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            if f.tell() == 0:
                return False
            f.seek(-1, os.SEEK_END)
            return f.read(1) != b"\n"
    except FileNotFoundError:
        return False


def backend(storage: str):
    """Optuna's journal file backend, with a lock that refuses an append onto a torn last line: a worker
    that died mid-append in a running sweep would otherwise have the next record glued onto its cut one."""
    class TailCheckedLock(JournalFileSymlinkLock):
        def acquire(self) -> bool:
            got = super().acquire()
            if ends_torn(storage):
                self.release()
                raise JournalError(f"the study journal {storage} ends in a torn record (a process died mid-write); "
                                   f"nothing more was written: `rlhf-sweep repair STUDY --storage {storage}` drops it and keeps a backup")
            return got

    return JournalFileBackend(storage, lock_obj=TailCheckedLock(storage))


def scan(path: Path) -> Scan:
    """Read a journal line by line: complete records, the first damaged line, an unterminated tail."""
    data = path.read_bytes()
    s = Scan(path=path, size=len(data), records=0, lines=0, studies=[])
    start, number = 0, 0
    while start < len(data):
        number += 1
        end = data.find(b"\n", start)
        if end < 0:
            s.torn_at, s.torn_line = start, number
            break
        try:
            rec = json.loads(data[start:end])
            if not isinstance(rec, dict) or "op_code" not in rec:
                raise ValueError("a JSON value that is not an Optuna record")
        except ValueError as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            if s.bad_line is None:
                s.bad_line = number
                s.bad_why = f"{e.msg} at column {e.colno}" if isinstance(e, json.JSONDecodeError) else " ".join(str(e).split())[:120]
        else:
            s.records += 1
            if rec.get("op_code") == 0 and "study_name" in rec:
                s.studies.append(str(rec["study_name"]))
        start = end + 1
    s.lines = number
    return s


def _repair_hint(s: Scan, storage: str) -> str:
    name = s.studies[0] if len(s.studies) == 1 else "STUDY"
    return f"rlhf-sweep repair {name} --storage {storage}"


def check(storage: str) -> Scan | None:
    """Raise JournalError unless `storage` (a journal file path) can be opened and appended to as it is.

    A path that names a folder (or ends with a slash) is refused before anything is created; a
    missing file is fine (Optuna creates it). Returns the scan of an existing file.
    """
    if storage.endswith(("/", os.sep)) or Path(storage).is_dir():
        example = layout.journal_path(storage)
        raise JournalError(f"--storage {storage} is a folder; give a journal file path (e.g. {example}) "
                           "or a database URL (sqlite:///..., postgresql://...)")
    path = Path(storage)
    if not path.exists():
        return None
    with locked(path):
        s = scan(path)
    if s.bad_line is not None:
        raise JournalError(damage_message(s))
    if s.torn_at is not None:
        raise JournalError(f"the study journal {storage} ends in a torn record (line {s.torn_line}: {s.torn_bytes} bytes without "
                           f"their end, from a crash or a full disk mid-write); nothing was written: `{_repair_hint(s, storage)}` "
                           "drops that tail and keeps a backup")
    return s


def damage_message(s: Scan) -> str:
    return (f"the study journal {s.path} is damaged at line {s.bad_line} of {s.lines} ({s.bad_why}): not a torn last record, "
            "so it is not repaired here and the file is left as it is; restore it from a backup (repair keeps them as *.bak-*)")


@dataclass
class Repair:
    path: Path
    backup: Path | None  # None: nothing was wrong
    dropped_bytes: int
    dropped_line: int | None
    records: int


def repair(storage: str) -> Repair:
    """Drop a torn final record from the journal `storage`, keeping a copy of the file as it was.

    Only an unterminated last line is dropped (Optuna never read it); damage anywhere else raises
    JournalError and the file is not touched.
    """
    if not is_journal(storage):
        raise JournalError(f"--storage {storage} is a database; repair is for journal files (a database keeps its "
                           "committed writes through a crash)")
    if storage.endswith(("/", os.sep)) or Path(storage).is_dir():
        check(storage)  # the folder message
    path = Path(storage)
    if not path.is_file():
        raise JournalError(f"no study journal at {storage}; pass --storage (or --out) where the sweep ran")
    with locked(path):
        s = scan(path)
        if s.bad_line is not None:
            raise JournalError(damage_message(s))
        if s.torn_at is None:
            return Repair(path, None, 0, None, s.records)
        backup = path.with_name(f"{path.name}.bak-{time.strftime('%Y%m%d-%H%M%S')}")
        n = 1
        while backup.exists():
            backup, n = path.with_name(f"{path.name}.bak-{time.strftime('%Y%m%d-%H%M%S')}-{n}"), n + 1
        shutil.copy2(path, backup)
        with open(path, "r+b") as f:
            f.truncate(s.torn_at)
            f.flush()
            os.fsync(f.fileno())
    return Repair(path, backup, s.torn_bytes, s.torn_line, s.records)
