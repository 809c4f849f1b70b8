"""The facility rows of ``sfxflow bench decode``: the same simulated Jungfrau 4M frames read as
LCLS-II XTC2 (psana), as a European XFEL run (extra-data) and received live from the karabo
bridge (extra-data's ``karabo-bridge-serve-files`` replaying that run), each where its package is
installed; the live row counts the frames the server sent against those received and spooled."""

from __future__ import annotations

import importlib.util
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from sfxflow.benchmarks.localhost import free_port

Row = tuple[str, str, int, float, float]


def _jungfrau_modules(cxi: Path) -> np.ndarray:
    from sfxflow.io.simulated import DATA_PATH

    with h5py.File(cxi, "r") as f:
        frames = f[DATA_PATH][...]
    # the Jungfrau's raw data are 14-bit integers
    frames = np.clip(np.rint(frames), 0, (1 << 14) - 1)
    return frames.reshape(frames.shape[0], -1, 512, frames.shape[-1])


def _constant_energy_geometry(geom_path: Path, energy_ev: float, out: Path) -> Any:
    from sfxflow.io.geometry import read_geom

    lines = [f"photon_energy = {energy_ev!r} eV" if ln.startswith("photon_energy") else ln
             for ln in geom_path.read_text().splitlines()]
    out.write_text("\n".join(lines) + "\n")
    return read_geom(str(out))


def facility_rows(cxi: Path, geom_path: Path, energy_ev: float, tmp: Path, repeats: int,
                  frames_per_block: int, time_decode: Callable[..., tuple[float, float, int]]
                  ) -> list[Row]:
    """XTC2, European XFEL run and live-bridge rows for the frames of one Jungfrau CXI file."""
    rows: list[Row] = []
    modules = _jungfrau_modules(cxi)
    geom = _constant_energy_geometry(geom_path, energy_ev, tmp / "facility.geom")
    if importlib.util.find_spec("psana") is not None:
        from sfxflow.io.xtc2 import write_xtc2

        xtc = tmp / "sfxbench-r0001-s000-c000.xtc2"
        write_xtc2(str(xtc), modules.astype(np.uint16), energy_ev)
        fps, bpf, n = time_decode([str(xtc)], geom, None, frames_per_block, repeats)
        rows.append(("Jungfrau4M LCLS-II XTC2 (psana)", "local", n, bpf, fps))
    else:
        print("no psana: XTC2 row skipped (pip install 'sfxflow[lcls]')")
    if importlib.util.find_spec("extra_data") is None:
        print("no extra-data: European XFEL rows skipped (pip install 'sfxflow[euxfel]')")
        return rows
    from sfxflow.io.euxfel import write_jungfrau_run

    run_dir = tmp / "r0001"
    write_jungfrau_run(run_dir, modules, cells_per_train=1, run=1)
    fps, bpf, n = time_decode([str(run_dir)], geom, None, frames_per_block, repeats)
    rows.append(("Jungfrau4M European XFEL run (extra-data)", "local", n, bpf, fps))
    rows.append(_live_row(run_dir, geom, tmp, repeats, frames_per_block, modules.shape[0]))
    return rows


def _live_row(run_dir: Path, geom: Any, tmp: Path, repeats: int, frames_per_block: int,
              n_frames: int) -> Row:
    from sfxflow.io.facility import modules_stacked
    from sfxflow.io.karabo import BridgeReceiver, spool_data_path, write_spool

    exe = shutil.which("karabo-bridge-serve-files") or str(
        Path(sys.executable).with_name("karabo-bridge-serve-files"))
    rates, lost = [], []
    for k in range(repeats):
        port = free_port()
        server = subprocess.Popen([exe, str(run_dir), f"tcp://127.0.0.1:{port}"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        spool = tmp / f"spool-{k}"
        receiver = BridgeReceiver(f"tcp://127.0.0.1:{port}", "REQ", poll_s=0.5)
        try:
            received = 0
            pending: list[Any] = []
            t0 = None
            deadline = time.monotonic() + 60 + n_frames
            while received < n_frames and time.monotonic() < deadline:
                train = receiver.next_train()
                if train is None:
                    continue
                t0 = t0 or time.perf_counter()
                received += train.n_frames
                pending.append(train)
                if sum(t.n_frames for t in pending) >= frames_per_block:
                    write_spool(spool, pending, spool_data_path(geom), modules_stacked(geom))
                    pending = []
            if pending:
                write_spool(spool, pending, spool_data_path(geom), modules_stacked(geom))
            # the first train's wait (server start-up) is not the stream's rate
            dt = time.perf_counter() - (t0 or time.perf_counter())
            rates.append((received - 1) / dt if received > 1 and dt > 0 else 0.0)
            lost.append(n_frames - received)
        finally:
            receiver.close()
            server.kill()
            server.wait()
    print(f"live karabo bridge: frames lost per replay {lost} (sent {n_frames} each time)")
    return (f"Jungfrau4M karabo bridge live (lost {max(lost)})", "tcp", n_frames,
            float("nan"), statistics.median(rates))
