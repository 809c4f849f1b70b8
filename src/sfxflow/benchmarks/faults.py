"""``sfxflow bench faults``: the fault matrix - what each fault costs a run, for real.

Every scenario runs ``sfxflow process`` in its own processes on a small simulated data set,
injects one real fault (a ``kill -9``, a storage endpoint that goes away or drops packets, a
file-size limit, a decoder that segfaults), then does what a user does - runs the same command
again while it asks for that (exit 75, 130, 143 or killed) - and compares the final
``frames.parquet`` with a clean serial run of the same data:

* frames lost: frames of the inputs without a record;
* duplicated: records beyond one per frame, counted over frames.parquet and over every frames
  shard left in the run directory (what merge and report read);
* wrongly final: records that differ from the clean run's (a frame recorded ``failed`` for a
  transient fault, say); the frames of a block that crashes its decoder are meant to be failed;
* time to recover: from the fault to the end of the run that completes it (reruns included).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sfxflow.options import number

HELP = "fault matrix: frames lost, duplicated and wrongly final, and time to recover, per fault"
DESCRIPTION = HELP + """

Scenarios (each a few tens of frames, all real processes): worker killed (kill -9 of a Dask
worker mid-run), client killed (kill -9 of the whole `sfxflow process` process group, then a
rerun), storage blip (the S3 endpoint refuses connections for a few seconds), blackhole (the
network to S3 drops packets silently for a few seconds), full disk (a file-size limit on the
process: the same OSError path as ENOSPC), decoder crash (a frame that segfaults the process),
Slurm job cancelled (skipped without Slurm), s3 run directory resumed (a Dask run into s3:// cut
short with --max-blocks, then finished). The S3 scenarios need moto (a development dependency).

Examples:
  sfxflow bench faults
  sfxflow bench faults --only "storage blip" --only blackhole --keep /tmp/faults
"""

CELL = "93 93 130.5 90 90 120"
SPACE_GROUP = "P6122"
CRASH_FILE = "run_0000.cxi"
CRASH_FRAME = 2
BUCKET = "faults"

Key = tuple[str, int]


def crash_on_one_frame(frame: Any, config: Any) -> Any:
    """A frame function that segfaults on one frame, as a native decoder does on a corrupt
    chunk (importable by the child process that runs it)."""
    import ctypes

    from sfxflow.pipeline.frame import process_frame

    if frame.index == CRASH_FRAME and frame.source_url.endswith(CRASH_FILE):
        ctypes.string_at(0)  # reads address 0: SIGSEGV
    return process_frame(frame, config)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    number(parser, "--frames", kind=int, default=16, ge=4, le=200,
           help="simulated frames, in 2 files (default 16)")
    number(parser, "--timeout-s", kind=float, default=240.0, gt=0, le=3600,
           help="a scenario still running after this is stopped and reported hung (default 240)")
    parser.add_argument("--only", action="append", default=[], metavar="FAULT",
                        help="run only this scenario (repeatable), e.g. 'worker killed'")
    parser.add_argument("--keep", metavar="DIR", help="keep the run directories here")


@dataclass
class Outcome:
    fault: str
    runs: int = 0
    lost: int | None = None
    duplicated: int | None = None
    wrongly_final: int | None = None
    recover_s: float | None = None
    note: str = ""
    skipped: str = ""


@dataclass
class Bench:
    work: Path
    files: list[Path]
    geometry: Path
    timeout_s: float
    reference: dict[Key, tuple[str, int]] = field(default_factory=dict)
    deadline: float = 0.0

    # ------------------------------------------------------------------------- commands
    def argv(self, out: str, *more: str, inputs: list[str] | None = None) -> list[str]:
        return [sys.executable, "-m", "sfxflow", "-q", "process",
                *(inputs if inputs is not None else [str(p) for p in self.files]),
                "--out", out, "--geometry", str(self.geometry), "--cell", CELL,
                "--space-group", SPACE_GROUP, "--no-progress", "--no-report",
                "--frames-per-block", "2", *more]

    def launch(self, argv: list[str], log: str, **kw: Any) -> subprocess.Popen:
        fh = open(self.work / log, "ab")  # closed with the process (wait)
        fh.write(f"$ {' '.join(argv)}\n".encode())
        fh.flush()
        proc = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, **kw)
        proc._log = fh  # type: ignore[attr-defined]
        proc._group = bool(kw.get("start_new_session"))  # type: ignore[attr-defined]
        return proc

    def wait(self, proc: subprocess.Popen) -> int | None:
        """The exit status, or ``None`` when the scenario's time ran out (process killed)."""
        try:
            return proc.wait(timeout=max(1.0, self.deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                if proc._group:  # type: ignore[attr-defined]
                    os.killpg(proc.pid, signal.SIGKILL)
                else:
                    proc.kill()
            proc.wait()
            return None
        finally:
            proc._log.close()  # type: ignore[attr-defined]

    def until_done(self, argv: list[str], log: str, runs: int, **kw: Any
                   ) -> tuple[int | None, int]:
        """Rerun ``argv`` while it asks to be rerun (at most 3 more times)."""
        code: int | None = 75
        for _ in range(3):
            code = self.wait(self.launch(argv, log, **kw))
            runs += 1
            if code is None or (code >= 0 and code not in (75, 130, 143)):
                break
        return code, runs

    def shards_written(self, out: Path, n: int) -> bool:
        """Wait until ``n`` frames shards exist in the local run directory ``out``."""
        while time.monotonic() < self.deadline:
            shards = out / "shards"
            if shards.is_dir() and sum(name.endswith(".frames.parquet")
                                       for name in os.listdir(shards)) >= n:
                return True
            time.sleep(0.05)
        return False

    # ------------------------------------------------------------------------- figures
    def measure(self, outcome: Outcome, out: str, code: int | None, t_fault: float,
                storage_options: dict[str, Any] | None = None,
                meant_to_fail: set[Key] = frozenset()) -> Outcome:  # type: ignore[assignment]
        import fsspec
        import pyarrow.parquet as pq

        if code is None:
            outcome.note = f"hung: stopped after {self.timeout_s:.0f} s"
            return outcome
        fs, root = fsspec.core.url_to_fs(out, **(storage_options or {}))
        fs.invalidate_cache()
        if code != 0 or not fs.exists(f"{root}/frames.parquet"):
            outcome.note = f"last run exit {code}, no frames.parquet" if code else \
                "no frames.parquet"
            outcome.lost = len(self.reference)
            return outcome
        with fs.open(f"{root}/frames.parquet", "rb") as fh:
            rows = pq.read_table(fh).to_pylist()
        keys: Counter[Key] = Counter((Path(r["source_url"]).name, r["frame_index"]) for r in rows)
        shard_keys: Counter[Key] = Counter()
        for name in fs.ls(f"{root}/shards", detail=False):
            if str(name).endswith(".frames.parquet"):
                with fs.open(name, "rb") as fh:
                    shard_keys.update((Path(r["source_url"]).name, r["frame_index"])
                                      for r in pq.read_table(fh).to_pylist())
        outcome.lost = sum(1 for k in self.reference if k not in keys)
        outcome.duplicated = sum(n - 1 for n in keys.values() if n > 1) + sum(
            n - 1 for n in shard_keys.values() if n > 1)
        outcome.wrongly_final = sum(
            1 for r in rows
            if (k := (Path(r["source_url"]).name, r["frame_index"])) not in meant_to_fail
            and self.reference.get(k) != (r["status"], r["n_crystals"]))
        outcome.recover_s = time.monotonic() - t_fault
        return outcome


def _reference(bench: Bench) -> None:
    import pyarrow.parquet as pq

    out = bench.work / "reference"
    code = bench.wait(bench.launch(bench.argv(str(out), "--scheduler", "synchronous"),
                                   "reference.log"))
    if code != 0:
        raise RuntimeError(f"the clean reference run failed (exit {code}); see "
                           f"{bench.work / 'reference.log'}")
    for r in pq.read_table(out / "frames.parquet").to_pylist():
        bench.reference[(Path(r["source_url"]).name, r["frame_index"])] = (r["status"],
                                                                           r["n_crystals"])


# ----------------------------------------------------------------------------- scenarios
@contextlib.contextmanager
def _dask_cluster(bench: Bench, n_workers: int = 2) -> Iterator[tuple[str, list[Any]]]:
    """A ``dask scheduler`` and single-threaded ``dask worker --no-nanny`` processes."""
    from sfxflow.benchmarks.localhost import free_port, stop_processes

    dask = str(Path(sys.executable).with_name("dask"))
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    procs = [bench.launch([dask, "scheduler", "--host", "127.0.0.1", "--port", str(port),
                           "--dashboard-address", "127.0.0.1:0"], "dask.log")]
    time.sleep(1.0)
    procs += [bench.launch([dask, "worker", address, "--nthreads", "1", "--no-nanny",
                            "--host", "127.0.0.1", "--no-dashboard"], "dask.log")
              for _ in range(n_workers)]
    try:
        from distributed import Client

        with Client(address, timeout="30s") as client:
            client.wait_for_workers(n_workers, timeout=60)
        yield address, procs[1:]
    finally:
        stop_processes(procs)
        for p in procs:
            p._log.close()  # type: ignore[attr-defined]


def worker_killed(bench: Bench, o: Outcome) -> Outcome:
    out = bench.work / "worker-killed"
    with _dask_cluster(bench) as (address, workers):
        proc = bench.launch(bench.argv(str(out), "--scheduler", address), "worker-killed.log")
        if not bench.shards_written(out, 2):
            o.note = "no shard before the deadline"
        workers[0].send_signal(signal.SIGKILL)
        t_fault = time.monotonic()
        code = bench.wait(proc)
        o.runs = 1
        if code not in (0, 1, None):
            code, o.runs = bench.until_done(bench.argv(str(out), "--scheduler", address),
                                            "worker-killed.log", o.runs)
        return bench.measure(o, str(out), code, t_fault)


def client_killed(bench: Bench, o: Outcome) -> Outcome:
    out = bench.work / "client-killed"
    argv = bench.argv(str(out), "--workers", "2")
    proc = bench.launch(argv, "client-killed.log", start_new_session=True)
    bench.shards_written(out, 2)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # the client and its local workers, as kill -9 does
    t_fault = time.monotonic()
    bench.wait(proc)
    code, o.runs = bench.until_done(argv, "client-killed.log", 1)
    return bench.measure(o, str(out), code, t_fault)


@contextlib.contextmanager
def _inputs_on_s3(bench: Bench) -> Iterator[tuple[dict[str, Any], Any] | None]:
    from sfxflow.benchmarks.local_s3 import local_s3
    from sfxflow.benchmarks.tcp_proxy import TcpProxy

    with local_s3(BUCKET) as opts:
        if opts is None:
            yield None
            return
        import s3fs

        fs = s3fs.S3FileSystem(**opts)
        for path in (*bench.files, bench.geometry):
            fs.put_file(str(path), f"{BUCKET}/in/{path.name}")
        port = int(opts["client_kwargs"]["endpoint_url"].rsplit(":", 1)[1])
        with TcpProxy(port) as proxy:
            yield opts, proxy


def _s3_env(opts: dict[str, Any]) -> dict[str, str]:
    return {**os.environ, "AWS_ACCESS_KEY_ID": opts["key"], "AWS_SECRET_ACCESS_KEY": opts["secret"],
            "AWS_DEFAULT_REGION": "us-east-1"}


def _storage_fault(bench: Bench, o: Outcome, name: str, fault_s: float,
                   inject: Callable[[Any], None]) -> Outcome:
    with _inputs_on_s3(bench) as s3:
        if s3 is None:
            o.skipped = "moto (a development dependency) is not installed"
            return o
        opts, proxy = s3
        out = bench.work / name
        argv = bench.argv(str(out), "--endpoint-url", proxy.url, "--scheduler", "synchronous",
                          "--prefetch", "0", "--set", "run.storage_retry_s=30",
                          inputs=[f"s3://{BUCKET}/in/run_*.cxi"])
        proc = bench.launch(argv, f"{name}.log", env=_s3_env(opts))
        bench.shards_written(out, 2)
        inject(proxy)
        t_fault = time.monotonic()
        time.sleep(fault_s)
        proxy.restore()
        code = bench.wait(proc)
        o.runs = 1
        if code in (75, 130, 143):
            code, o.runs = bench.until_done(argv, f"{name}.log", 1, env=_s3_env(opts))
        o.note = f"{fault_s:.0f} s fault, run.storage_retry_s 30"
        return bench.measure(o, str(out), code, t_fault)


def storage_blip(bench: Bench, o: Outcome) -> Outcome:
    return _storage_fault(bench, o, "storage-blip", 5.0, lambda proxy: proxy.cut())


def blackhole(bench: Bench, o: Outcome) -> Outcome:
    return _storage_fault(bench, o, "blackhole", 10.0, lambda proxy: proxy.blackhole())


def _limit_file_size() -> None:
    # what a full disk does to a write (EFBIG instead of ENOSPC; the same OSError path)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (6000, 6000))


def full_disk(bench: Bench, o: Outcome) -> Outcome:
    out = bench.work / "full-disk"
    argv = bench.argv(str(out), "--scheduler", "synchronous")
    first = bench.wait(bench.launch(argv, "full-disk.log", preexec_fn=_limit_file_size))
    t_fault = time.monotonic()  # the disk has room again
    code, o.runs = bench.until_done(argv, "full-disk.log", 1)
    o.note = f"file-size limit 6000 B: first run exit {first}"
    return bench.measure(o, str(out), code, t_fault)


_CRASH_SCRIPT = """
import json, sys
from sfxflow.benchmarks.faults import crash_on_one_frame
from sfxflow.pipeline.config import load_config
from sfxflow.pipeline.run import run_process
files, out, overrides = json.loads(sys.argv[1])
r = run_process(files, out, load_config(overrides=overrides), frame_fn=crash_on_one_frame)
sys.exit(0 if r.complete else 75)
"""


def decoder_crash(bench: Bench, o: Outcome) -> Outcome:
    out = bench.work / "decoder-crash"
    overrides = [f"io.geometry='{bench.geometry}'", "io.frames_per_block=2",
                 "target.cell=[93, 93, 130.5, 90, 90, 120]", f"target.space_group='{SPACE_GROUP}'",
                 "run.report=false", "cluster.kind=synchronous"]
    argv = [sys.executable, "-c", _CRASH_SCRIPT,
            json.dumps([[str(p) for p in bench.files], str(out), overrides])]
    first = bench.wait(bench.launch(argv, "decoder-crash.log"))
    t_fault = time.monotonic()
    code, o.runs = bench.until_done(argv, "decoder-crash.log", 1)
    o.runs = max(o.runs, 2)
    how = f"signal {signal.Signals(-first).name}" if first is not None and first < 0 else \
        f"exit {first}"
    o.note = f"first run {how}; the block is isolated, its 2 frames failed by design"
    block = CRASH_FRAME - CRASH_FRAME % 2
    return bench.measure(o, str(out), code, t_fault,
                         meant_to_fail={(CRASH_FILE, block), (CRASH_FILE, block + 1)})


def slurm_cancelled(bench: Bench, o: Outcome) -> Outcome:
    if shutil.which("sbatch") is None:
        o.skipped = "no Slurm here (sbatch not found; `make slurm-up` starts a test cluster)"
    else:
        o.skipped = ("not automated here: tests/pipeline/test_slurm.py "
                     "(test_scancelled_worker_job_loses_no_frame) measures it")
    return o


def s3_run_resumed(bench: Bench, o: Outcome) -> Outcome:
    from sfxflow.benchmarks.local_s3 import local_s3

    with local_s3(BUCKET) as opts:
        if opts is None:
            o.skipped = "moto (a development dependency) is not installed"
            return o
        endpoint = opts["client_kwargs"]["endpoint_url"]
        out = f"s3://{BUCKET}/out/run"
        first = bench.argv(out, "--endpoint-url", endpoint, "--workers", "2", "--max-blocks", "3")
        code = bench.wait(bench.launch(first, "s3-resumed.log", env=_s3_env(opts)))
        t_fault = time.monotonic()
        again = bench.argv(out, "--endpoint-url", endpoint, "--workers", "2")
        code, o.runs = bench.until_done(again, "s3-resumed.log", 1, env=_s3_env(opts))
        o.note = "Dask, 2 workers, first run --max-blocks 3"
        return bench.measure(o, out, code, t_fault,
                             storage_options={"key": opts["key"], "secret": opts["secret"],
                                              "client_kwargs": opts["client_kwargs"]})


SCENARIOS: dict[str, Callable[[Bench, Outcome], Outcome]] = {
    "worker killed": worker_killed,
    "client killed": client_killed,
    "storage blip": storage_blip,
    "blackhole": blackhole,
    "full disk": full_disk,
    "decoder crash": decoder_crash,
    "Slurm job cancelled": slurm_cancelled,
    "s3 run dir resumed": s3_run_resumed,
}


def table(outcomes: list[Outcome]) -> str:
    """The matrix as a Markdown table (for the README)."""
    def cell(v: Any) -> str:
        return "-" if v is None else f"{v:.1f}" if isinstance(v, float) else str(v)

    lines = ["| fault | runs | frames lost | duplicated | wrongly final | recover s | note |",
             "|---|---|---|---|---|---|---|"]
    for o in outcomes:
        if o.skipped:
            lines.append(f"| {o.fault} | - | - | - | - | - | skipped: {o.skipped} |")
            continue
        lines.append(f"| {o.fault} | {o.runs} | {cell(o.lost)} | {cell(o.duplicated)} | "
                     f"{cell(o.wrongly_final)} | {cell(o.recover_s)} | {o.note} |")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from sfxflow.algorithms import layouts
    from sfxflow.algorithms.simulate import SimulationParams
    from sfxflow.errors import InputError
    from sfxflow.io.simulated import write_simulated_dataset

    unknown = [name for name in args.only if name not in SCENARIOS]
    if unknown:
        raise InputError(f"--only {unknown[0]!r}: expected one of {', '.join(SCENARIOS)}")
    chosen = [name for name in SCENARIOS if not args.only or name in args.only]
    keep = Path(args.keep) if args.keep else None
    with (contextlib.nullcontext(str(keep)) if keep else tempfile.TemporaryDirectory()) as tmp:
        work = Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        info = write_simulated_dataset(work / "in", layouts.simple(distance_mm=100.0, n_px=1024),
                                       None, SimulationParams(hit_fraction=0.5),
                                       n_frames=args.frames, n_files=2, seed=11)
        bench = Bench(work, list(info.files), Path(info.geometry_path), args.timeout_s)
        bench.deadline = time.monotonic() + args.timeout_s
        _reference(bench)
        logs = f"; logs in {work}" if keep else ""
        print(f"fault matrix: {args.frames} frames in 2 files, blocks of 2, against a clean serial "
              f"run{logs}", flush=True)
        outcomes = []
        for name in chosen:
            bench.deadline = time.monotonic() + args.timeout_s
            outcome = Outcome(name)
            t0 = time.monotonic()
            try:
                outcome = SCENARIOS[name](bench, outcome)
            except Exception as exc:  # one broken scenario must not hide the others' figures
                outcome.note = f"scenario error: {type(exc).__name__}: {exc}"
            outcomes.append(outcome)
            print(f"  {name}: done in {time.monotonic() - t0:.0f} s", file=sys.stderr, flush=True)
        print(table(outcomes))
    bad = [o for o in outcomes if not o.skipped and (o.lost or o.duplicated or o.wrongly_final
                                                    or o.lost is None)]
    return 1 if bad else 0

