"""The report page's HTML: inline SVG without addresses, escaping, sections that degrade."""

from __future__ import annotations

import numpy as np

from sfxflow.pipeline.report import AlongRun, ReportData, Unavailable
from sfxflow.report.html import render_report_html


def _data(**changes) -> ReportData:
    base = dict(title="sfxflow run r1", run_url="/data/r1", state="complete", running=False,
                generated_at="2026-11-28 10:00:00 UTC", overview=Unavailable("no frames yet"),
                along=Unavailable("no frames yet"), crystals=Unavailable("no indexed frame"),
                merged=Unavailable("no merged data in this run"),
                picture=Unavailable("no indexed frame yet"))
    base.update(changes)
    return ReportData(**base)


def test_plots_are_inline_svg_without_any_address():
    along = AlongRun(frame_end=np.array([10, 20, 30]), hit_rate=np.array([0.2, 0.3, 0.1]),
                     indexing_rate=np.array([1.0, 0.5, np.nan]),
                     mean_spots=np.array([12.0, 30.0, 5.0]),
                     n_spots={"miss": np.array([1, 2, 0, 3]), "indexed": np.array([40, 55])})
    page = render_report_html(_data(along=along))
    assert page.count("<svg") == 2 and "viewBox=" in page
    for forbidden in ("<?xml", "<!DOCTYPE svg", "xmlns", "<metadata", "http://", "https://",
                      "<script", "<link"):
        assert forbidden not in page, forbidden


def test_text_from_the_run_is_escaped_and_every_missing_part_says_why():
    page = render_report_html(_data(run_url='/data/<script>alert("x")</script>',
                                    title="run & co"))
    assert "<script>" not in page and "&lt;script&gt;" in page and "run &amp; co" in page
    for reason in ("no frames yet", "no indexed frame", "no merged data in this run",
                   "no indexed frame yet"):
        assert f"not available: {reason}" in page
    assert 'http-equiv="refresh"' not in page  # a finished run's page does not reload
    running = render_report_html(_data(running=True, state="running: 1 of 4 blocks done"))
    assert '<meta http-equiv="refresh" content="60">' in running


def _crystals(n: int, rng: np.random.Generator):
    from sfxflow.pipeline.report import Crystals

    cell = (93.0, 93.0, 130.5, 90.0, 90.0, 120.0)
    cells = {k: v * (1 + 0.004 * rng.standard_normal(n))
             for k, v in zip(("a", "b", "c", "alpha", "beta", "gamma"), cell, strict=True)}
    return Crystals(cells=cells, source="every crystal", target_cell=cell,
                    resolution_limit_a=rng.uniform(1.8, 4.0, n),
                    crystals_per_frame=np.ones(n, dtype=np.int64))


def _diagnostics(n: int, rng: np.random.Generator):
    from sfxflow.pipeline.report import Diagnostics, PanelOffsets

    offsets = PanelOffsets(panels=np.arange(64), dfs_px=np.full(64, 0.8),
                           dss_px=np.full(64, -0.4), n=np.full(64, 100))
    return Diagnostics(d_a=rng.uniform(1.8, 20.0, n), intensity=rng.lognormal(6.0, 1.0, n),
                       indexed=rng.random(n) < 0.6, offsets=offsets, source="spots")


def test_the_page_size_does_not_grow_with_the_number_of_crystals_or_spots():
    """Beyond a few thousand points the scatter and the peakogram become 2-D histograms."""
    rng = np.random.default_rng(0)
    small = render_report_html(_data(crystals=_crystals(300, rng),
                                     diagnostics=_diagnostics(2_000, rng)))
    large = render_report_html(_data(crystals=_crystals(100_000, rng),
                                     diagnostics=_diagnostics(300_000, rng)))
    assert "one dot per crystal" in small and "crystals per bin" in large
    assert len(large) < 1.5 * len(small) and len(large) < 450_000
    assert "fs +0.80 px, ss -0.40 px (6,400 spots)" in large
