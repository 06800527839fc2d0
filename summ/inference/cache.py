"""Generated text kept on disk, so that a sweep never generates (or pays for) the same text
twice: (backend, task, text) -> text in SQLite, shared by runs, sweeps and processes."""

from __future__ import annotations

import hashlib
import sqlite3
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from summ.files import WriteFailed, make_folder

TASKS = ("ko_en", "en_ko", "paraphrase")  # what a generation backend is asked to do


class Backend(Protocol):
    name: str

    def generate(self, texts: Sequence[str], task: str) -> list[str]: ...


class DiskCache:
    """(backend, task, text) -> generated text, in SQLite (safe for several processes)."""

    def __init__(self, path: Path, setting: str = "the cache folder"):
        """`setting`: the config key that names the folder, for the one line when it cannot be one."""
        try:
            make_folder(path.parent, for_file=path)
            self._db = sqlite3.connect(str(path), timeout=30, check_same_thread=False)
        except (WriteFailed, sqlite3.Error) as exc:
            raise WriteFailed(
                f"{setting}={path.parent}: {exc}; set {setting} to a folder that can be written, or null"
            ) from None
        self._db.execute("CREATE TABLE IF NOT EXISTS gen (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        self._lock = threading.Lock()

    @staticmethod
    def key(backend: str, task: str, text: str) -> str:
        return hashlib.sha256(f"{backend}\x00{task}\x00{text}".encode()).hexdigest()

    def get_many(self, keys: Sequence[str]) -> dict[str, str]:
        with self._lock:
            out = {}
            for i in range(0, len(keys), 500):
                chunk = list(keys[i : i + 500])
                marks = ",".join("?" * len(chunk))
                out.update(self._db.execute(f"SELECT key, value FROM gen WHERE key IN ({marks})", chunk).fetchall())
            return out

    def put_many(self, items: dict[str, str]) -> None:
        with self._lock, self._db:
            self._db.executemany("INSERT OR REPLACE INTO gen VALUES (?, ?)", list(items.items()))


class Cached:
    """Wraps a backend: texts already generated come from the cache; `misses` counts the rest."""

    def __init__(self, backend: Backend, cache: DiskCache):
        self.backend, self.cache = backend, cache
        self.name = backend.name
        self.misses = 0

    def generate(self, texts: Sequence[str], task: str) -> list[str]:
        keys = [DiskCache.key(self.backend.name, task, t) for t in texts]
        found = self.cache.get_many(keys)
        todo = sorted({t for t, k in zip(texts, keys) if k not in found})
        if todo:
            self.misses += len(todo)
            made = self.backend.generate(todo, task)
            new = {DiskCache.key(self.backend.name, task, t): m for t, m in zip(todo, made)}
            self.cache.put_many(new)
            found.update(new)
        return [found[k] for k in keys]
