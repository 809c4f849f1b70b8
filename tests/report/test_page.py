"""The final page's picture drawn in a forked child (sfxflow.report.page._PictureAside): the
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
from sfxflow.report.html import picture_png, render_report_html

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


def test_picture_drawn_aside_gives_the_same_page():
    alone = render_report_html(_data()).encode("utf-8")
    before = _children()
    data = _data()
    aside = page._render(data, picture_aside=True)
    assert data.picture.png == picture_png(_data().picture)  # the child's PNG, byte for byte
    assert _without_ids(aside.decode()) == _without_ids(alone.decode())
    assert _children() <= before  # the child is gone (waited for, no zombie)


def test_child_that_fails_or_hangs_leaves_the_picture_to_the_parent(monkeypatch):
    parent = os.getpid()
    expected = picture_png(_data().picture)

    def failing(p):
        if os.getpid() != parent:
            raise RuntimeError("the child fails")
        return picture_png(p)

    monkeypatch.setattr(page, "picture_png", failing)
    data = _data()
    page._render(data, picture_aside=True)
    assert data.picture.png == expected

    def hanging(p):
        if os.getpid() != parent:
            time.sleep(120)
        return picture_png(p)

    monkeypatch.setattr(page, "picture_png", hanging)
    monkeypatch.setattr(page, "PICTURE_ASIDE_TIMEOUT_S", 0.5)
    before = _children()
    t0 = time.monotonic()
    data = _data()
    page._render(data, picture_aside=True)
    assert data.picture.png == expected and time.monotonic() - t0 < 30
    assert _children() <= before  # the hung child is killed


def test_a_picture_that_cannot_be_drawn_fails_the_page_as_before(monkeypatch):
    def broken(p):
        raise ValueError("no picture")

    monkeypatch.setattr(page, "picture_png", broken)
    with pytest.raises(ValueError, match="no picture"):
        page._render(_data(), picture_aside=True)
