"""Run many independent evaluations in worker processes, with an on-disk cache of results.

Used by the quantization analyzer (one job per model variant) and meant to be reused by any
sweep over model variants (e.g. compression ratios). The parts:

* a **runner factory**: a picklable, argument-free callable (a module-level function or a
  dataclass instance with ``__call__``) that each worker process calls once to build its
  runner — there it loads models, data, and opens its own onnxruntime sessions;
* **jobs**: ``(key, payload)`` pairs; ``runner(payload)`` returns a JSON-serializable dict;
* a :class:`ResultCache`: one small JSON file per job under ``directory``, named by
  ``sha256(namespace, key)``, where ``namespace`` is a digest of everything the results depend
  on (model bytes, evaluation data, evaluator identity). A rerun with the same namespace reads
  finished jobs back and runs only the missing ones; any change in the inputs changes the
  namespace, so stale results are never read. Writes are atomic (temporary file, rename).

Workers are started with the ``spawn`` method (a fresh interpreter: onnxruntime's thread pools
do not survive ``fork``). ``workers <= 1`` runs the jobs in this process, in order. A job that
raises gives ``{"error": "<type>: <message>"}`` (logged, not cached) instead of stopping the
sweep.
"""

from __future__ import annotations

__all__ = ["ResultCache", "WorkerPool", "defined_in_main", "digest", "run_sweep"]

import concurrent.futures as cf
import contextlib
import hashlib
import json
import logging
import multiprocessing
import os
import sys
import time
import types
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

Job = tuple[str, Any]


def digest(*parts: Any) -> str:
    """sha256 hex digest of ``parts``: bytes as they are, paths by content, anything else as JSON."""
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, (bytes, bytearray, memoryview)):
            h.update(bytes(part))
        elif isinstance(part, Path):
            with part.open("rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
        else:
            h.update(json.dumps(part, sort_keys=True, default=str).encode())
        h.update(b"\x00")
    return h.hexdigest()


class ResultCache:
    """JSON results on disk, keyed by ``sha256(namespace, key)``."""

    def __init__(self, directory: str | os.PathLike, namespace: str) -> None:
        self.directory = Path(directory)
        self.namespace = namespace
        self.hits = 0
        self.misses = 0

    def _file(self, key: str) -> Path:
        return self.directory / f"{digest(self.namespace, key)[:40]}.json"

    def get(self, key: str) -> dict | None:
        file = self._file(key)
        try:
            data = json.loads(file.read_text())
        except (OSError, ValueError):
            self.misses += 1
            return None
        if data.get("key") != key:  # a hash collision or a foreign file: ignore it
            self.misses += 1
            return None
        self.hits += 1
        return data["result"]

    def put(self, key: str, result: Mapping[str, Any]) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        file = self._file(key)
        tmp = file.with_name(f".{file.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"key": key, "result": result}, default=_json_default))
        tmp.replace(file)


def _json_default(obj: Any) -> Any:
    try:
        import numpy as np

        if isinstance(obj, np.generic):
            return obj.item()
        if isinstance(obj, np.ndarray):
            return obj.tolist()
    except ImportError:  # pragma: no cover
        pass
    return str(obj)


@contextlib.contextmanager
def _main_not_rerun():
    """Start spawned workers without re-running the caller's ``__main__`` script in them.

    ``spawn`` re-executes the main script in every child (so that functions defined there can be
    unpickled); a script that calls an analysis without an ``if __name__ == "__main__"`` guard
    would start it again in each worker. The workers need only onnxq and importable modules, so
    while they start, ``__main__`` is replaced by an empty module. Callables defined in
    ``__main__`` therefore cannot run in workers (callers run those in-process instead).
    """
    main = sys.modules.get("__main__")
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        if main is not None:
            sys.modules["__main__"] = main


def defined_in_main(obj: Any) -> bool:
    """True for a function or class defined in the ``__main__`` script (workers cannot load it)."""
    return getattr(obj, "__module__", None) == "__main__"


# -- worker side -----------------------------------------------------------------------------------
_RUNNER: Callable[[Any], dict] | None = None


def _init_worker(factory: Callable[[], Callable[[Any], dict]]) -> None:
    global _RUNNER
    _RUNNER = factory()


def _run_job(key: str, payload: Any) -> tuple[str, dict, float]:
    assert _RUNNER is not None, "worker not initialized"
    return _call(_RUNNER, key, payload)


def _call(runner: Callable[[Any], dict], key: str, payload: Any) -> tuple[str, dict, float]:
    start = time.perf_counter()
    try:
        result = dict(runner(payload))
    except Exception as exc:  # noqa: BLE001 - one failed job must not stop the sweep
        lines = [line for line in str(exc).splitlines() if line.strip()]
        result = {"error": f"{type(exc).__name__}: {lines[0] if lines else ''}"}
    return key, result, time.perf_counter() - start


class WorkerPool:
    """``workers`` spawned processes, each with the runner ``factory()`` built once; reusable
    across sweeps (started on first use, stopped by :meth:`close` or ``with``)."""

    def __init__(self, factory: Callable[[], Callable[[Any], dict]], workers: int) -> None:
        self.factory = factory
        self.workers = max(1, int(workers))
        self._pool: cf.ProcessPoolExecutor | None = None

    def run(self, jobs: Sequence[Job]) -> Iterator[tuple[str, dict, float]]:
        """Yield ``(key, result, seconds)`` as jobs finish, in any order."""
        if self._pool is None:
            ctx = multiprocessing.get_context("spawn")
            self._pool = cf.ProcessPoolExecutor(
                self.workers, mp_context=ctx, initializer=_init_worker, initargs=(self.factory,)
            )
        with _main_not_rerun():  # workers start at the first submits
            futures = [self._pool.submit(_run_job, key, payload) for key, payload in jobs]
        for future in cf.as_completed(futures):
            yield future.result()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def run_sweep(
    factory: Callable[[], Callable[[Any], dict]],
    jobs: Iterable[Job],
    *,
    workers: int = 1,
    cache: ResultCache | None = None,
    progress: Callable[[int], Any] | None = None,
    local_runner: Callable[[Any], dict] | None = None,
    pool: WorkerPool | None = None,
) -> dict[str, dict]:
    """Results of ``jobs`` by key: cached ones read back, the rest run by ``workers`` processes.

    ``factory`` must be picklable when ``workers > 1``. ``local_runner``: an already built runner
    for ``workers <= 1`` (saves building a second one). ``pool``: a running :class:`WorkerPool`
    to reuse (its workers keep what they loaded between sweeps). ``progress(n)`` is called as jobs finish
    (cached ones included). Each result gets ``"seconds"`` (the job's wall time; 0 when cached)
    and ``"cached"``.
    """
    jobs = list(jobs)
    keys = [k for k, _ in jobs]
    if len(set(keys)) != len(keys):
        raise ValueError("job keys must be unique")
    results: dict[str, dict] = {}
    todo: list[Job] = []
    for key, payload in jobs:
        hit = cache.get(key) if cache is not None else None
        if hit is not None:
            results[key] = {**hit, "cached": True, "seconds": 0.0}
            if progress is not None:
                progress(1)
        else:
            todo.append((key, payload))
    if not todo:
        return results

    def done(key: str, result: dict, seconds: float) -> None:
        if "error" in result:
            log.warning("job %s failed: %s", key, result["error"])
        elif cache is not None:
            cache.put(key, result)
        results[key] = {**result, "cached": False, "seconds": seconds}
        if progress is not None:
            progress(1)

    if workers <= 1 or (len(todo) == 1 and local_runner is not None):
        runner = local_runner if local_runner is not None else factory()
        for key, payload in todo:
            done(*_call(runner, key, payload))
        return {k: results[k] for k in keys if k in results}

    own = pool is None
    if own:
        pool = WorkerPool(factory, workers)
    log.info("sweep: %d jobs (%d cached) on %d worker processes", len(todo), len(results), pool.workers)
    try:
        for key, result, seconds in pool.run(todo):
            done(key, result, seconds)
    finally:
        if own:
            pool.close()
    return {k: results[k] for k in keys if k in results}
