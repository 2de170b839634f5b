"""Where `score_recording` runs: in-process (`local`) or on Ray Data (`ray`), and what comes out.

Both engines run the same `RecordingScorer` (edge.fleet.rescore) on whole recordings, so for the
same recordings and bundles their rows are identical (tests hash them). Ray Data runs a
`map_batches` stage whose actors each hold one copy of both models, in a fixed pool of N actors
(`ActorPoolStrategy(size=N)`, formerly `concurrency=N`). Each actor asks for fewer CPUs than the
machine has (`actor_cpus`): a dataset whose actors take every CPU hangs in backpressure, as
nothing is left for the tasks that feed them (ray-project/ray#44687; reproduced on 2 cores with
concurrency=2, num_cpus=1).

Ray and pyarrow are the `fleet` extra, imported only inside the functions that need them.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from edge.fleet.rescore import ROW_FIELDS, RecordingScorer, RescoreJob, Row
from scanner_io.choices import Choice
from scanner_io.errors import MissingDependencyError, SourceUnavailableError

Progress = Callable[..., None]


class Engine(Choice):
    """Where the re-scoring runs."""

    local = "local"
    ray = "ray"


def expand_recordings(inputs: Sequence[str | os.PathLike[str]]) -> list[Path]:
    """Return the MCAP files named by files, directories (their `*.mcap`) and glob patterns, sorted."""
    found: list[Path] = []
    for item in inputs:
        text = str(item)
        p = Path(text)
        if p.is_dir():
            found += sorted(p.glob("*.mcap"))
        elif p.is_file():
            found.append(p)
        elif any(ch in text for ch in "*?["):
            found += sorted(Path(m) for m in glob.glob(text) if m.endswith(".mcap"))
        else:
            raise SourceUnavailableError(f"recording {text} does not exist")
    unique = list(dict.fromkeys(found))
    if not unique:
        raise SourceUnavailableError(f"no .mcap recordings in {', '.join(map(str, inputs))}")
    return unique


def run_local(paths: Sequence[Path], job: RescoreJob, progress: Progress | None = None) -> list[Row]:
    """Score the recordings one after another in this process; `progress(done, total)` after each."""
    rows: list[Row] = []
    with RecordingScorer(job) as scorer:
        for i, path in enumerate(paths):
            rows += scorer(path)
            if progress is not None:
                progress(i + 1, total=len(paths))
    return rows


class _ScoreActor:
    """A Ray Data actor: builds its models once, in its own worker process, then scores batches."""

    def __init__(self, job: RescoreJob) -> None:
        self.scorer = RecordingScorer(job)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import numpy as np

        out = [json.dumps(self.scorer(str(path))) for path in batch["path"]]
        # Rows travel as JSON text: columns that are all None in one batch and numbers in another
        # would give blocks of different Arrow types.
        return {"index": np.asarray(batch["index"]), "rows": np.asarray(out, dtype=object)}


def actor_cpus(total_cpus: float, actors: int, threads: int) -> float:
    """CPUs one actor asks for: its threads, but never so many that the actors take every CPU.

    Actors together get at most max(total − 1, total / 2), so at least one CPU (half of a
    one-CPU machine) stays free for the tasks that feed them.
    """
    budget = max(total_cpus - 1.0, total_cpus / 2.0)
    return max(0.05, min(float(threads), budget / max(1, actors)))


def import_ray() -> Any:
    """Return the ray module with Ray Data loaded, or say what to install."""
    try:
        import ray
        import ray.data  # noqa: F401  (the Data library is a separate part of ray[data])
    except ImportError as exc:
        raise MissingDependencyError(
            "--engine ray needs Ray Data: pip install 'thzedge[fleet]' (ray[data], pyarrow)"
        ) from exc
    return ray


def run_ray(
    paths: Sequence[Path],
    job: RescoreJob,
    actors: int = 1,
    address: str | None = None,
    num_cpus: int | None = None,
    progress: Progress | None = None,
) -> list[Row]:
    """Score the recordings on Ray Data with `actors` actors; rows in the order of `paths`.

    Joins the cluster at `address`, else starts a local Ray with `num_cpus` CPUs (default: all)
    and shuts it down afterwards. An already initialised Ray (a test's) is used as it is.
    """
    ray = import_ray()
    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        # Ray Data logs every dataset's plan and progress at INFO; ours is `progress`.
        for name in ("ray", "ray.data"):
            logging.getLogger(name).setLevel(logging.WARNING)
    started = False
    if not ray.is_initialized():
        ray.init(
            address=address,
            num_cpus=num_cpus if address is None else None,
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=False,
        )
        started = True
    data_ctx = ray.data.DataContext.get_current()
    bars = data_ctx.enable_progress_bars
    data_ctx.enable_progress_bars = False  # ours (`progress`) is the one on the terminal
    try:
        total = float(ray.cluster_resources().get("CPU", 1.0))
        per_actor = actor_cpus(total, actors, job.threads)
        ds = ray.data.from_items([{"index": i, "path": str(p)} for i, p in enumerate(paths)])
        ds = ds.map_batches(
            _ScoreActor,
            fn_constructor_kwargs={"job": job},
            batch_size=1,
            batch_format="numpy",
            # A fixed pool of `actors` actors (what `concurrency=N` meant before Ray 2.51).
            compute=ray.data.ActorPoolStrategy(size=actors),
            num_cpus=per_actor,
        )
        by_index: dict[int, list[Row]] = {}
        for rec in ds.iter_rows():
            by_index[int(rec["index"])] = json.loads(rec["rows"])
            if progress is not None:
                progress(len(by_index), total=len(paths))
    finally:
        data_ctx.enable_progress_bars = bars
        if started:
            ray.shutdown()
    return [row for i in range(len(paths)) for row in by_index.get(i, [])]


def run_engine(
    engine: Engine,
    paths: Sequence[Path],
    job: RescoreJob,
    actors: int = 1,
    address: str | None = None,
    progress: Progress | None = None,
) -> tuple[list[Row], float]:
    """Run the chosen engine; return the rows and the seconds it took."""
    t0 = time.perf_counter()
    if engine is Engine.ray:
        rows = run_ray(paths, job, actors=actors, address=address, progress=progress)
    else:
        rows = run_local(paths, job, progress=progress)
    return rows, time.perf_counter() - t0


def require_pyarrow() -> Any:
    """Return the pyarrow module, or say what to install (checked before any work is done)."""
    try:
        import pyarrow as pa
        import pyarrow.parquet  # noqa: F401
    except ImportError as exc:
        raise MissingDependencyError("Parquet output needs pyarrow: pip install 'thzedge[fleet]'") from exc
    return pa


def write_parquet(rows: Sequence[Row], path: Path) -> Path:
    """Write the rows as one Parquet file with a fixed schema (types do not depend on the values)."""
    pa = require_pyarrow()
    import pyarrow.parquet as pq

    types = {
        "seq": pa.int64(),
        "confidence": pa.float64(),
        "confidence_baseline": pa.float64(),
        "score": pa.float64(),
        "score_baseline": pa.float64(),
        "recon_ssim": pa.float64(),
    }
    schema = pa.schema([(name, types.get(name, pa.string())) for name in ROW_FIELDS])
    table = pa.table({name: [r.get(name) for r in rows] for name in ROW_FIELDS}, schema=schema)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return path


def read_parquet(path: Path) -> list[Row]:
    """Read rows written by `write_parquet` back as dicts."""
    import pyarrow.parquet as pq

    return list(pq.read_table(path).to_pylist())
