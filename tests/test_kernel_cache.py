"""The container image's compiled kernels, copied into a writable numba cache (sfxflow.kernel_cache)."""

import logging
from pathlib import Path

import pytest

from sfxflow.kernel_cache import SEED_VARIABLE, seed_numba_cache


def _seed(tmp_path: Path) -> Path:
    seed = tmp_path / "image-cache"
    (seed / "algorithms_abc").mkdir(parents=True)
    (seed / "algorithms_abc" / "spots._sweep_band-602.py311.nbi").write_bytes(b"index")
    (seed / "algorithms_abc" / "spots._sweep_band-602.py311.1.nbc").write_bytes(b"code")
    return seed


def test_copies_the_image_cache_once_and_keeps_numbas_own_entries(tmp_path: Path) -> None:
    seed, target = _seed(tmp_path), tmp_path / "node-cache"
    own = target / "algorithms_abc" / "spots._sweep_band-602.py311.nbi"
    own.parent.mkdir(parents=True)
    own.write_bytes(b"compiled on this node")
    env = {SEED_VARIABLE: str(seed), "NUMBA_CACHE_DIR": str(target)}

    assert seed_numba_cache(env) == 1
    assert own.read_bytes() == b"compiled on this node"
    assert (target / "algorithms_abc" / "spots._sweep_band-602.py311.1.nbc").read_bytes() == b"code"
    assert not list(target.rglob("*.partial"))
    (target / "algorithms_abc" / "spots._sweep_band-602.py311.1.nbc").unlink()
    assert seed_numba_cache(env) == 0  # seeded once per cache folder, not at every import


@pytest.mark.parametrize("case", ["no seed", "no cache dir", "same folder", "missing seed"])
def test_does_nothing_without_a_seed_and_a_separate_cache(tmp_path: Path, case: str) -> None:
    seed, target = _seed(tmp_path), tmp_path / "node-cache"
    env = {
        "no seed": {"NUMBA_CACHE_DIR": str(target)},
        "no cache dir": {SEED_VARIABLE: str(seed)},
        "same folder": {SEED_VARIABLE: str(seed), "NUMBA_CACHE_DIR": str(seed)},
        "missing seed": {SEED_VARIABLE: str(tmp_path / "absent"), "NUMBA_CACHE_DIR": str(target)},
    }[case]
    assert seed_numba_cache(env) == 0
    assert not target.exists()


def test_an_unwritable_cache_costs_compilation_not_the_run(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    seed, target = _seed(tmp_path), tmp_path / "node-cache"
    target.write_text("a file where the cache folder should be")  # unwritable even for root
    with caplog.at_level(logging.WARNING, logger="sfxflow.kernel_cache"):
        assert seed_numba_cache({SEED_VARIABLE: str(seed), "NUMBA_CACHE_DIR": str(target)}) == 0
    assert "numba compiles them instead" in caplog.text
