"""The final page's sections drawn in a forked child (sfxflow.report.page._DrawnAside): the
same page as drawn in one process, and a child that fails or hangs never costs the page."""

from __future__ import annotations

import os
import re
import time

import numpy as np
import pytest

import sfxflow.report.page as page
from sfxflow.algorithms.layouts import simple
from sfxflow.models import Beam, Frame
from sfxflow.pipeline.report import AlongRun, FramePicture, ReportData, Unavailable
from sfxflow.report.html import render_report_html, render_sections

pytestmark = pytest.mark.skipif(not page._can_fork_aside(),
                                reason="needs fork and two cores for the child")


def _data() -> ReportData:
    rng = np.random.default_rng(3)
    det = simple(n_px=160)
    data = rng.poisson(3.0, (160, 160)).astype(np.float32)
    data[60:63, 90:93] = 400
    picture = FramePicture(frame=Frame(data, det, Beam(1.3), "x.cxi", 0),
                           spots={"found": {"panel": np.array([0]), "fs_px": np.array([91.5]),
                                            "ss_px": np.array([61.5])}},
                           predicted=None, title="frame 0", caption="the strongest frame")
    along = AlongRun(frame_end=np.array([10, 20, 30]), hit_rate=np.array([0.2, 0.3, 0.1]),
                     indexing_rate=np.array([1.0, 0.5, np.nan]),
                     mean_spots=np.array([12.0, 30.0, 5.0]),
                     n_spots={"miss": np.array([1, 2, 0, 3]), "indexed": np.array([40, 55])})
    return ReportData(title="run", run_url="/data/run", state="complete", running=False,
                      generated_at="2026-12-06 09:00:00 UTC",
                      overview=Unavailable("no frames yet"), along=along,
                      crystals=Unavailable("no indexed frame"),
                      merged=Unavailable("no merged data in this run"), picture=picture)


def _without_ids(html: str) -> str:
    """matplotlib names each SVG's clip paths and markers at random: the rest must match."""
    html = re.sub(r'id="[^"]+"', 'id=""', html)
    return re.sub(r'(url\(|href=")#[^)"]+', r"\1#", html)


def _children() -> set[int]:
    try:
        with open(f"/proc/{os.getpid()}/task/{os.getpid()}/children") as f:
            return {int(p) for p in f.read().split()}
    except OSError:
        return set()


def test_sections_drawn_aside_give_the_same_page(monkeypatch):
    alone = _without_ids(render_report_html(_data()))
    before = _children()
    drawn: list[int] = []
    real = page.render_sections

    def spy(data, keys=None):
        drawn.append(os.getpid())
        return real(data, keys)

    monkeypatch.setattr(page, "render_sections", spy)
    aside = page._render(_data(), aside=True).decode()
    assert _without_ids(aside) == alone  # the PNG byte for byte, the SVGs but for their ids
    assert drawn == [os.getpid()]  # this process drew its own share only: the child the rest
    assert _children() <= before  # the child is gone (waited for, no zombie)


def test_child_that_fails_or_hangs_leaves_its_sections_to_the_parent(monkeypatch):
    parent = os.getpid()
    expected = _without_ids(render_report_html(_data()))

    def failing(data, keys=None):
        if os.getpid() != parent:
            raise RuntimeError("the child fails")
        return render_sections(data, keys)

    monkeypatch.setattr(page, "render_sections", failing)
    assert _without_ids(page._render(_data(), aside=True).decode()) == expected

    def hanging(data, keys=None):
        if os.getpid() != parent:
            time.sleep(120)
        return render_sections(data, keys)

    monkeypatch.setattr(page, "render_sections", hanging)
    monkeypatch.setattr(page, "ASIDE_TIMEOUT_S", 0.5)
    before = _children()
    t0 = time.monotonic()
    assert _without_ids(page._render(_data(), aside=True).decode()) == expected
    assert time.monotonic() - t0 < 30
    assert _children() <= before  # the hung child is killed


def test_a_picture_that_cannot_be_drawn_fails_the_page_as_before(monkeypatch):
    import sfxflow.report.html as html

    def broken(p):
        raise ValueError("no picture")

    monkeypatch.setattr(html, "_picture_png", broken)
    with pytest.raises(ValueError, match="no picture"):
        page._render(_data(), aside=True)
