"""Run directories: ``manifest.json``, ``results.json``, ``records.jsonl`` (+ ``report.html``).

- Every JSON file is written atomically (temp file + rename): never half-written.
- ``records.jsonl`` is a journal: records of a chunk of items are appended in one write, followed by a
  ``chunk_done`` marker line. On a rerun with the same arguments, finished chunks are reused and unfinished
  ones dropped, so an interrupted run resumes and ends with numbers identical to an uninterrupted run.
- A directory holding a run made with different arguments is refused unless ``force``.
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

from .errors import BiaslabError
from .outputs import DirLock, check_target, claim_run_dir, preflight


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temp file and a rename: never half-written; on any failure (a full
    disk, a read-only directory) the temp file is removed and one clear error names the path."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        raise BiaslabError(f"cannot write {path}: {e.strerror or e}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default, allow_nan=False) + "\n")


def _json_default(o):
    try:
        import numpy as np

        if isinstance(o, np.generic):
            return o.item()
    except ImportError:  # pragma: no cover
        pass
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def clean_nan(obj):
    """NaN/inf → None so results are strict JSON (undefined metrics are reported as null)."""
    if isinstance(obj, float):
        return None if obj != obj or obj in (float("inf"), float("-inf")) else obj
    if isinstance(obj, dict):
        return {k: clean_nan(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean_nan(v) for v in obj]
    return obj


def command_line() -> str:
    """How this process was started, as a shell line (``biaslab …`` for the CLI, else the interpreter's argv)."""
    import shlex

    argv = list(sys.argv)
    if argv and (Path(argv[0]).name in ("biaslab", "__main__.py") or argv[0].endswith("biaslab/__main__.py")):
        argv = ["biaslab"] + argv[1:]
    return shlex.join(argv)


def environment_info() -> dict:
    pkgs = {}
    for name in ("biaslab", "torch", "transformers", "peft", "numpy", "safetensors", "tokenizers"):
        try:
            pkgs[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    commit = None
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                                cwd=Path(__file__).resolve().parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        pass
    from .distributed import describe

    procs = describe()
    return {"python": sys.version.split()[0], "platform": platform.platform(), "packages": pkgs, "git_commit": commit,
            **({"processes": procs} if procs else {})}


def _parse_journal(path: Path) -> tuple[dict[tuple[str, int], list[dict]], list[str], bool]:
    """Read a ``records.jsonl`` journal: the records of each finished (benchmark, chunk), the journal lines
    that hold them (records + markers), and whether anything unfinished (or a torn last line) was left out."""
    finished: dict[tuple[str, int], list[dict]] = {}
    if not path.exists():
        return finished, [], False
    pending: dict[tuple[str, int], list[dict]] = {}
    kept_lines: list[str] = []
    torn = False
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().split("\n")
    except UnicodeDecodeError:
        raise BiaslabError(f"{path} is not a biaslab journal (not UTF-8 text); move it away or choose another --out") from None
    last = max((i for i, raw in enumerate(lines) if raw.strip()), default=-1)
    for i, raw in enumerate(lines):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError:
            if i == last:
                torn = True
                break  # a torn last line from an interrupted write
            raise BiaslabError(f"{path}, line {i + 1}: not JSON — the journal was edited or damaged; move the run "
                               "directory away or choose another --out") from None
        if not isinstance(obj, dict) or "benchmark" not in obj or not ("chunk_done" in obj or "chunk" in obj):
            raise BiaslabError(f"{path}, line {i + 1}: not a biaslab journal record (expected an object with "
                               "'benchmark' and 'chunk'); move the run directory away or choose another --out")
        if "chunk_done" in obj:
            key = (obj["benchmark"], obj["chunk_done"])
            recs = pending.pop(key, [])
            finished[key] = recs
            kept_lines += [json.dumps(r, default=_json_default) for r in recs] + [raw]
        else:
            pending.setdefault((obj["benchmark"], obj["chunk"]), []).append(obj)
    return finished, kept_lines, torn or bool(pending)


def read_records(run_dir, benchmark: str | None = None) -> list[dict]:
    """The finished records of a run directory's journal (all benchmarks, or one), in journal order, without
    the journal's bookkeeping fields (``benchmark``, ``chunk``); [] when the directory has no journal."""
    finished, _, _ = _parse_journal(Path(run_dir) / "records.jsonl")
    return [{k: v for k, v in r.items() if k not in ("benchmark", "chunk")}
            for (bench, _), recs in finished.items() if benchmark in (None, bench) for r in recs]


class RunDir:
    """One run directory. ``args`` identifies the run: a rerun must pass equal args to resume."""

    def __init__(self, path, args: dict, *, force: bool = False, extra_manifest: dict | None = None):
        from . import distributed as D

        self.follower = not D.is_main()   # under torch.distributed only rank 0 touches the directory
        mine = None
        if self.follower:
            self.path, self.args = Path(path), json.loads(json.dumps(args, default=_json_default))
            self.manifest = {"args": self.args, "timings_s": {}, **(extra_manifest or {})}
            self._results, self._records = None, {}
        else:
            try:
                self._open(path, args, force=force, extra_manifest=extra_manifest)
            except BiaslabError as e:
                mine = e
        if D.world_size() > 1:
            err = D.broadcast(str(mine) if mine is not None else None)   # every rank fails alike: none waits
            if err is not None and mine is None:
                raise BiaslabError(err)
        if mine is not None:
            raise mine

    def _open(self, path, args: dict, *, force: bool, extra_manifest: dict | None) -> None:
        self.path = check_target(path)
        self.args = json.loads(json.dumps(args, default=_json_default))
        preflight(self.path)  # refuse a foreign directory before writing anything into it
        self.path.mkdir(parents=True, exist_ok=True)
        self.lock = DirLock(self.path).acquire()
        try:
            _, old = claim_run_dir(self.path, self.args, force=force)
        except BaseException:
            self.lock.release()
            raise
        self.manifest = {"args": self.args, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                         "status": "running", "environment": environment_info(), "command": command_line(),
                         "timings_s": {}, **(extra_manifest or {})}
        if old is not None:
            self.manifest["created"] = old.get("created", self.manifest["created"])
            self.manifest["timings_s"] = old.get("timings_s", {})
        self._results: dict | None = None
        self._records: dict[str, dict[int, list[dict]]] = {}
        self._load_journal()
        self.write_manifest()

    # ---- manifest
    def write_manifest(self, **updates) -> None:
        self.manifest.update(updates)
        if self.follower:
            return
        atomic_write_json(self.path / "manifest.json", clean_nan(self.manifest))

    # ---- journal
    @property
    def journal(self) -> Path:
        return self.path / "records.jsonl"

    def _load_journal(self) -> None:
        finished, kept_lines, torn = _parse_journal(self.journal)
        for (bench, chunk), recs in finished.items():
            self._records.setdefault(bench, {})[chunk] = recs
        if torn:  # drop records of unfinished chunks so the journal holds only finished work
            atomic_write_text(self.journal, "".join(line + "\n" for line in kept_lines))

    def finished_chunk(self, benchmark: str, chunk: int) -> list[dict] | None:
        return self._records.get(benchmark, {}).get(chunk)

    def append_chunk(self, benchmark: str, chunk: int, records: list[dict]) -> None:
        if self.follower:
            return
        lines = [json.dumps({**r, "benchmark": benchmark, "chunk": chunk}, default=_json_default) for r in records]
        lines.append(json.dumps({"benchmark": benchmark, "chunk_done": chunk}))
        try:
            with open(self.journal, "a", encoding="utf-8") as f:
                f.write("".join(line + "\n" for line in lines))
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            raise BiaslabError(f"cannot write {self.journal}: {e.strerror or e}") from None
        self._records.setdefault(benchmark, {})[chunk] = [{**r, "benchmark": benchmark, "chunk": chunk} for r in records]

    # ---- results
    def write_results(self, results: dict) -> None:
        """results.json, marked ``"complete": false`` until :meth:`finish` (a killed run's file never looks final)."""
        self._results = results
        if not self.follower:
            atomic_write_json(self.path / "results.json", clean_nan({**results, "complete": False}))

    def finish(self, **updates) -> None:
        if self.follower:
            return
        if self._results is not None:
            atomic_write_json(self.path / "results.json", clean_nan({**self._results, "complete": True}))
        self.write_manifest(status="finished", finished=datetime.now(timezone.utc).isoformat(timespec="seconds"), **updates)
        self.lock.release()


JOURNAL_FIELDS = ("benchmark", "chunk")


def score_journaled(run: "RunDir | None", key: str, items: list, chunk: int, score) -> list[dict]:
    """``score(items[c:c + chunk])`` chunk by chunk, each finished chunk appended to ``run``'s journal under
    ``key``; on a rerun, finished chunks are read back instead of scored (resume). The one chunk loop behind
    the audit, every mitigation's evaluation and the soft-prompt probe."""
    from . import distributed as D
    from .progress import stage

    if D.world_size() > 1:
        return D.score_chunks_distributed(run, key, items, chunk, score,
                                          strip=lambda r: {k: v for k, v in r.items() if k not in JOURNAL_FIELDS})
    records: list[dict] = []
    with stage(key, len(items)) as st:
        for c in range(0, len(items), chunk):
            no = c // chunk
            part = items[c:c + chunk]
            if st is not None:
                st.start_chunk(len(part))
            done = run.finished_chunk(key, no) if run else None
            if done is not None:
                records += [{k: v for k, v in r.items() if k not in JOURNAL_FIELDS} for r in done]
                if st is not None:
                    st.end_chunk(resumed=True)
                continue
            recs = score(part)
            if run:
                run.append_chunk(key, no, recs)
            records += recs
            if st is not None:
                st.end_chunk()
    return records


class Timer:
    def __init__(self):
        self.t0 = time.perf_counter()

    def elapsed(self) -> float:
        return round(time.perf_counter() - self.t0, 2)
