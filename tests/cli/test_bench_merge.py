"""The crystal subsets of ``sfxflow bench merge --images``."""

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
