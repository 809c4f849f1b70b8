"""The crystal subsets of ``sfxflow bench merge --images`` and its comparison on common reflections."""

from sfxflow.benchmarks.merge import filter_stream, nested_subsets


def test_nested_subsets_are_nested_seeded_and_bounded():
    subsets = nested_subsets(100, [50, 10, 200, 100, 10], seed=3)
    assert list(subsets) == [10, 50, 100]
    assert [len(v) for v in subsets.values()] == [10, 50, 100]
    assert set(subsets[10]) <= set(subsets[50]) <= set(subsets[100]) == set(range(100))
    assert len(set(subsets[50])) == 50
    again = nested_subsets(100, [10], seed=3)[10]
    assert list(again) == list(subsets[10])
    assert list(nested_subsets(100, [10], seed=4)[10]) != list(again)


def _chunk(event: str, n_crystals: int) -> str:
    crystals = "".join(f"--- Begin crystal\nCell {event} {k}\n--- End crystal\n"
                       for k in range(n_crystals))
    return (f"----- Begin chunk -----\nImage filename: a.cxi\nEvent: {event}\nhit = 1\n"
            f"{crystals}----- End chunk -----\n")


def test_filter_stream_keeps_the_header_and_the_chosen_crystals_only():
    text = "CrystFEL stream format 2.3\n" + _chunk("//0", 2) + _chunk("//1", 1) + _chunk("//2", 0)
    out = "".join(filter_stream(text, {("a.cxi", "//0", 1), ("a.cxi", "//1", 0)}))
    assert out.startswith("CrystFEL stream format 2.3\n----- Begin chunk -----\n")
    assert "Cell //0 1" in out and "Cell //1 0" in out and "Cell //0 0" not in out
    assert out.count("--- Begin crystal") == 2 and out.count("----- End chunk -----") == 2
    assert "Event: //2" not in out  # a chunk left without a crystal goes
    assert "".join(filter_stream(text, set())) == "CrystFEL stream format 2.3\n"


def test_common_cc_compares_merges_on_the_reflections_all_of_them_hold(tmp_path):
    """The truth itself scores 1 whatever the file's convention (here Friedel mates), a noisy
    copy less, and only reflections both files hold (with >= 2 observations) count."""
    import gemmi
    import numpy as np

    from sfxflow.algorithms.simulate_physical import TrueIntensities
    from sfxflow.benchmarks.merge import _common_cc
    from sfxflow.io.hkl import write_hkl
    from sfxflow.io.mtz import MergedColumns

    uc, sg = gemmi.UnitCell(40, 40, 60, 90, 90, 90), gemmi.SpaceGroup("P 41 21 2")
    hkl = np.asarray(gemmi.make_miller_array(uc, sg, 3.0, 0, True))
    rng = np.random.default_rng(0)
    i_true = rng.exponential(100.0, len(hkl))
    truth = TrueIntensities.from_arrays(uc, sg, hkl, i_true, i_true)

    def write(name, rows, values, n):
        nan = np.full(len(rows), np.nan)
        write_hkl(tmp_path / name, sg, MergedColumns(rows, values, np.ones(len(rows)), nan, nan,
                                                     nan, nan, n))
        return tmp_path / name

    half = len(hkl) // 2
    exact = write("exact.hkl", -hkl[:half + 20], i_true[:half + 20], np.full(half + 20, 3))
    n_noisy = np.full(len(hkl), 5)
    n_noisy[:10] = 1  # too few observations: not compared
    noisy = write("noisy.hkl", hkl, i_true * rng.normal(1.0, 0.3, len(hkl)), n_noisy)
    cc, n_common = _common_cc({"exact": exact, "noisy": noisy}, truth, 3.0)
    assert n_common == half + 10
    assert cc["exact"] > 0.9999 and 0.5 < cc["noisy"] < 0.99
