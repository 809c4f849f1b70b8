"""The run report as one self-contained HTML page: plain HTML + CSS, plots as inline SVG.

The page is built from a :class:`~sfxflow.pipeline.report.ReportData` (gathered from a run
directory by :mod:`sfxflow.pipeline.report`) and needs nothing else to be read: no scripts, no style sheets,
no fonts or images from anywhere (beamline and cluster machines are often offline). Plots are
drawn with matplotlib (already a dependency) as SVG: vector, so they stay sharp when zoomed or
printed into a logbook, and a whole report is a few hundred kB whatever the run size, because
every plot shows aggregates (histograms, per-block rates), never one mark per frame. An
interactive plotting library would have to inline its script (Plotly's is over 3 MB) into every
refreshed page, and a script is one more thing that can fail in the reader's browser; this page
has none. The picture of the strongest frame is a PNG embedded as a ``data:`` URI.

Each section is either its data or an :class:`Unavailable` with the reason, shown in its place
("not available: no merged data in this run") so that a report of a run still going, or of a run
made before a stage existed, is complete as far as the run goes.
"""

from __future__ import annotations

import base64
import html
import io
import math
import os
import re
import tempfile
from collections.abc import Collection, Mapping, Sequence
from typing import Any

import numpy as np

from sfxflow.pipeline.report import (
    ICE_RINGS_A,
    AlongRun,
    Crystals,
    Diagnostics,
    FramePicture,
    Merged,
    PanelOffsets,
    ReportData,
    RunOverview,
    Scaling,
    Throughput,
    Unavailable,
)

__all__ = ["SECTION_KEYS", "render_report_html", "render_sections"]

CELL_NAMES = ("a", "b", "c", "alpha", "beta", "gamma")
_CELL_UNITS = {"a": "Å", "b": "Å", "c": "Å", "alpha": "°", "beta": "°", "gamma": "°"}
_BLUE, _ORANGE, _GREEN, _RED, _GREY = "#1f77b4", "#e07b00", "#2a9d3f", "#c0392b", "#777777"

# ----------------------------------------------------------------------------------------------
# formatting


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _num(value: float | None, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return f"{value:.{digits}g}" if abs(value) < 10 ** digits else f"{value:,.0f}"


def _pct(value: float | None) -> str:
    return "–" if value is None or not math.isfinite(value) else f"{100 * value:.1f}%"


def _duration(seconds: float | None) -> str:
    """``3 h 05 min``, ``4 min 12 s`` or ``12.3 s``.

    >>> _duration(11105.0), _duration(252.0), _duration(12.34)
    ('3 h 05 min', '4 min 12 s', '12.3 s')
    """
    if seconds is None or not math.isfinite(seconds):
        return "–"
    if seconds >= 3600:
        h, rest = divmod(round(seconds), 3600)
        return f"{h} h {rest // 60:02d} min"
    if seconds >= 60:
        m, s = divmod(round(seconds), 60)
        return f"{m} min {s:02d} s"
    return f"{seconds:.1f} s"


def _money(usd: float) -> str:
    """Dollars: cents for sums of a dollar or more, three digits below.

    >>> _money(1234.5), _money(0.004321)
    ('1,234.50', '0.00432')
    """
    return f"{usd:,.2f}" if usd >= 1 else f"{usd:.3g}"


def _unavailable(item: Unavailable) -> str:
    return f'<p class="na">not available: {_e(item.reason)}</p>'


# ----------------------------------------------------------------------------------------------
# plots


def _figure(width_in: float, height_in: float, ncols: int = 1, nrows: int = 1, *,
            right_in: float = 0.2, wspace: float = 0.3, hspace: float = 0.55) -> tuple[Any, Any]:
    from matplotlib.figure import Figure

    # fixed margins in inches: a layout engine (constrained, tight) costs more than the drawing
    fig = Figure(figsize=(width_in, height_in))
    fig.subplots_adjust(left=0.75 / width_in, right=1.0 - right_in / width_in,
                        bottom=0.55 / height_in, top=1.0 - 0.3 / height_in,
                        wspace=wspace, hspace=hspace)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for ax in axes.ravel():
        ax.grid(True, color="#e4e4e4", linewidth=0.6)
        ax.set_axisbelow(True)
        for side in ("top", "right"):
            ax.spines[side].set_visible(False)
    return fig, axes


_SVG_PROLOG = re.compile(r"\A.*?(?=<svg\b)", re.S)
_SVG_METADATA = re.compile(r"<metadata>.*?</metadata>\s*", re.S)
_SVG_XMLNS = re.compile(r'\s+xmlns(?::\w+)?="[^"]*"')
_SVG_SIZE = re.compile(r'\s+(?:width|height)="[\d.]+pt"')


def _svg(fig: Any, label: str) -> str:
    """The figure as an inline ``<svg>`` element scaled to the column width.

    The XML prolog, document type, RDF metadata and namespace declarations are dropped: the
    HTML parser places inline ``<svg>`` in the SVG namespace by itself, and the page then holds
    no address of any kind.
    """
    from matplotlib import rc_context

    buf = io.StringIO()
    # text as <text> (selectable, a third of the size of glyph outlines)
    with rc_context({"svg.fonttype": "none"}):
        fig.savefig(buf, format="svg", metadata={"Date": None})
    text = _SVG_PROLOG.sub("", buf.getvalue(), count=1)
    text = _SVG_METADATA.sub("", text, count=1)
    head, sep, rest = text.partition(">")
    head = _SVG_SIZE.sub("", _SVG_XMLNS.sub("", head))
    head += f' role="img" aria-label="{_e(label)}"'
    return f'<figure class="plot">{head}{sep}{rest}</figure>'


def _inv_d2_ticks(ax: Any, inv_d2: np.ndarray) -> None:
    """Label an axis in 1/d² with the resolution d in Å, as the field reads it."""
    finite = inv_d2[np.isfinite(inv_d2)]
    hi = float(finite.max()) if finite.size else 0.0
    if not hi > 0:
        return
    candidates = (0.8, 0.9, 1.0, 1.1, 1.2, 1.3, 1.4, 1.5, 1.6, 1.8, 2.0, 2.2, 2.5, 3.0, 3.5, 4.0,
                  5.0, 6.0, 8.0, 10.0, 20.0)
    ticks: list[float] = []
    for d in candidates:  # from high resolution down, keeping labels apart on the 1/d² axis
        x = 1.0 / d**2
        if x <= hi * 1.02 and (not ticks or 1.0 / ticks[-1] ** 2 - x >= hi / 8.0):
            ticks.append(d)
    ax.set_xticks([1.0 / d**2 for d in ticks])
    ax.set_xticklabels([f"{d:g}" for d in ticks])
    ax.set_xlabel("resolution d (Å), axis linear in 1/d²")


def _throughput_svg(t: Throughput) -> str:
    fig, axes = _figure(9.0, 3.2, ncols=2)
    ax_cum, ax_rate = axes[0]
    order = np.argsort(t.times_s, kind="stable")
    times, frames = t.times_s[order], t.frames[order]
    workers = np.asarray(t.workers, dtype=object)[order]
    names = sorted(set(workers.tolist()))
    minutes = times / 60.0
    for i, name in enumerate(names):
        mine = workers == name
        x = np.concatenate([[0.0], minutes[mine]])
        y = np.concatenate([[0], np.cumsum(frames[mine])])
        ax_cum.step(x, y, where="post", linewidth=1.2, color=f"C{i % 10}",
                    label=_short_worker(name) if len(names) <= 10 else None)
    ax_cum.set_xlabel(f"minutes since {t.t0_text}")
    ax_cum.set_ylabel("frames done (cumulative)")
    ax_cum.set_title(f"frames per worker ({len(names)} worker{'s' * (len(names) != 1)})",
                     fontsize=10)
    if 1 < len(names) <= 10:
        ax_cum.legend(fontsize=7, frameon=False)
    span = float(minutes.max()) if minutes.size else 0.0
    n_bins = int(np.clip(minutes.size // 3, 1, 40))
    edges = np.linspace(0.0, max(span, 1e-6), n_bins + 1)
    counts, _ = np.histogram(minutes, bins=edges, weights=frames)
    width_s = (edges[1] - edges[0]) * 60.0
    ax_rate.stairs(counts / width_s, edges, fill=True, color=_BLUE, alpha=0.35)
    ax_rate.stairs(counts / width_s, edges, color=_BLUE, linewidth=1.2)
    ax_rate.set_xlabel(f"minutes since {t.t0_text}")
    ax_rate.set_ylabel("frames/s (all workers)")
    ax_rate.set_title("throughput of the run", fontsize=10)
    return _svg(fig, "throughput per worker over time")


def _short_worker(name: str) -> str:
    return name.split("://", 1)[-1]


def _along_svg(a: AlongRun) -> str:
    fig, axes = _figure(9.0, 4.6, nrows=2)
    ax, ax_spots = axes[0][0], axes[1][0]
    x = a.frame_end
    ax.plot(x, 100 * a.hit_rate, color=_BLUE, linewidth=1.2, label="hit rate (% of frames)")
    ax.plot(x, 100 * a.indexing_rate, color=_ORANGE, linewidth=1.2,
            label="indexing rate (% of hits)")
    ax.set_ylim(0, 105)
    ax.set_ylabel("%")
    ax.legend(fontsize=8, frameon=False, loc="lower left")
    per = "block" if a.pooled == 1 else f"{a.pooled} blocks"
    ax.set_title(f"hit and indexing rate per {per}", fontsize=10)
    ax_spots.plot(x, a.mean_spots, color=_GREEN, linewidth=1.2)
    ax_spots.set_ylabel("spots per frame (mean)")
    ax_spots.set_xlabel("frames along the run (files in order, frames in file order)")
    ax_spots.set_ylim(bottom=0)
    return _svg(fig, "hit rate, indexing rate and spots per frame along the run")


def _spots_hist_svg(a: AlongRun) -> str:
    fig, axes = _figure(9.0, 2.8)
    ax = axes[0][0]
    everything = np.concatenate([v for v in a.n_spots.values() if v.size] or [np.zeros(0)])
    top = int(np.percentile(everything, 99.5)) + 1 if everything.size else 1
    edges = np.histogram_bin_edges(np.arange(top + 1), bins=min(top + 1, 60))
    labels = [k for k in ("miss", "hit", "indexed") if k in a.n_spots]
    colours = {"miss": _GREY, "hit": _BLUE, "indexed": _ORANGE}
    base = np.zeros(edges.size - 1)
    for k in labels:
        counts, _ = np.histogram(np.minimum(a.n_spots[k], edges[-1] - 1e-9), bins=edges)
        # stacked: each status drawn on top of the ones before it
        ax.stairs(base + counts, edges, baseline=base.copy(), fill=True, color=colours[k],
                  label=f"{k} ({a.n_spots[k].size:,})")
        base += counts
    ax.set_yscale("log")
    ax.set_xlabel(f"spots per frame (the last bin holds everything ≥ {edges[-2]:.0f})")
    ax.set_ylabel("frames")
    if labels:
        ax.legend(fontsize=8, frameon=False)
    return _svg(fig, "histogram of spots per frame")


def _cells_svg(c: Crystals) -> str:
    fig, axes = _figure(9.0, 4.6, ncols=3, nrows=2)
    for ax, name in zip(axes.ravel(), CELL_NAMES, strict=True):
        v = c.cells[name]
        v = v[np.isfinite(v)]
        if v.size:
            lo, hi = np.percentile(v, [0.5, 99.5])
            pad = max(hi - lo, 0.02 * abs(float(np.median(v))), 0.2) * 0.25
            counts, edges = np.histogram(v, bins=50, range=(lo - pad, hi + pad))
            ax.stairs(counts, edges, fill=True, color=_BLUE, alpha=0.8)
            ax.set_title(f"{name}: median {np.median(v):.2f} {_CELL_UNITS[name]}, "
                         f"σ {np.std(v):.2f}", fontsize=9)
        if c.target_cell is not None:
            ax.axvline(c.target_cell[CELL_NAMES.index(name)], color=_RED, linewidth=1.0,
                       linestyle="--")
        ax.set_xlabel(f"{name} ({_CELL_UNITS[name]})")
        ax.tick_params(labelsize=8)
    axes[0][0].set_ylabel("crystals")
    axes[1][0].set_ylabel("crystals")
    return _svg(fig, "unit cell parameter histograms")


def _resolution_svg(res: np.ndarray) -> str:
    fig, axes = _figure(4.4, 3.0)
    ax = axes[0][0]
    v = res[np.isfinite(res) & (res > 0)]
    if v.size:
        lo, hi = (float(x) for x in np.percentile(v, [0.5, 99.5]))
        pad = max(hi - lo, 0.2) * 0.1
        counts, edges = np.histogram(v, bins=40, range=(max(lo - pad, 0.0), hi + pad))
        ax.stairs(counts, edges, fill=True, color=_GREEN)
    ax.set_xlabel("resolution limit (Å)")
    ax.set_ylabel("crystals")
    ax.set_title(f"per-crystal resolution limit (median {np.median(v) if v.size else math.nan:.2f}"
                 " Å)", fontsize=9)
    return _svg(fig, "per-crystal resolution limit")


def _per_frame_svg(n: np.ndarray) -> str:
    fig, axes = _figure(4.4, 3.0)
    ax = axes[0][0]
    values, counts = np.unique(n[n > 0], return_counts=True)
    ax.bar(values, counts, color=_ORANGE, width=0.7)
    ax.set_xticks(values)
    ax.set_xlabel("crystals on the frame")
    ax.set_ylabel("indexed frames")
    ax.set_title(f"crystals per indexed frame (mean {n[n > 0].mean() if (n > 0).any() else 0:.2f})",
                 fontsize=9)
    return _svg(fig, "crystals per frame")


def _shell_arrays(stats: Mapping[str, Any]) -> dict[str, np.ndarray]:
    shells = list(stats.get("shells") or [])

    def col(key: str) -> np.ndarray:
        return np.array([np.nan if s.get(key) is None else float(s[key]) for s in shells])

    d_max, d_min = col("d_max_a"), col("d_min_a")
    mid = 0.5 * (1.0 / np.where(np.isfinite(d_max) & (d_max > 0), d_max, np.inf) ** 2
                 + 1.0 / d_min**2)
    out = {"inv_d2": mid}
    for key in ("cc_half", "cc_star", "completeness", "multiplicity", "mean_i_over_sigma",
                "r_split", "cc_truth"):
        out[key] = col(key)
    return out


def _merged_svg(m: Merged) -> str:
    s = _shell_arrays(m.stats)
    x = s["inv_d2"]
    fig, axes = _figure(9.0, 6.2, ncols=2, nrows=2, right_in=0.7, wspace=0.45, hspace=0.45)
    ax_cc, ax_comp, ax_isig, ax_wilson = axes.ravel()
    ax_cc.plot(x, s["cc_half"], "o-", color=_BLUE, label="CC1/2", markersize=3)
    ax_cc.plot(x, s["cc_star"], "s-", color=_ORANGE, label="CC*", markersize=3)
    if np.isfinite(s["cc_truth"]).any():
        ax_cc.plot(x, s["cc_truth"], "^-", color=_GREEN, label="CC to truth", markersize=3)
    ax_cc.set_ylim(min(0.0, float(np.nanmin(np.r_[s["cc_half"], 0.0]))), 1.02)
    ax_cc.set_ylabel("correlation")
    ax_cc.legend(fontsize=8, frameon=False)
    ax_cc.set_title("CC1/2 and CC*", fontsize=10)
    ax_comp.plot(x, 100 * s["completeness"], "o-", color=_BLUE, markersize=3)
    ax_comp.set_ylim(0, 105)
    ax_comp.set_ylabel("completeness (%)", color=_BLUE)
    twin = ax_comp.twinx()
    twin.plot(x, s["multiplicity"], "s-", color=_ORANGE, markersize=3)
    twin.set_ylabel("multiplicity", color=_ORANGE)
    twin.set_ylim(bottom=0)
    ax_comp.set_title("completeness and multiplicity", fontsize=10)
    ax_isig.plot(x, s["mean_i_over_sigma"], "o-", color=_GREEN, markersize=3)
    ax_isig.set_ylabel("⟨I/σ(I)⟩")
    ax_isig.set_ylim(bottom=0)
    ax_isig.set_title("signal to noise", fontsize=10)
    for ax in (ax_cc, ax_comp, ax_isig):
        _inv_d2_ticks(ax, x)
    wilson = m.stats.get("wilson") or {}
    wx = np.asarray(wilson.get("inv_d2") or [], dtype=float)
    wy = np.asarray(wilson.get("ln_mean_i") or [], dtype=float)
    ok = np.isfinite(wx) & np.isfinite(wy)
    wx, wy = wx[ok], wy[ok]
    ax_wilson.plot(wx, wy, ".", color=_BLUE, markersize=4)
    b = wilson.get("b_a2")
    if b is not None and wx.size:
        # ln<I> = c - B/(2 d²): the intercept that fits the points for the merge's B
        c = float(np.mean(wy + 0.5 * float(b) * wx))
        xs = np.linspace(float(wx.min()), float(wx.max()), 2)
        ax_wilson.plot(xs, c - 0.5 * float(b) * xs, color=_RED, linewidth=1.0,
                       label=f"B = {float(b):.1f} Å²")
        ax_wilson.legend(fontsize=8, frameon=False)
    ax_wilson.set_xlabel("1/d² (Å⁻²)")
    ax_wilson.set_ylabel("ln⟨I⟩")
    ax_wilson.set_title("Wilson plot", fontsize=10)
    return _svg(fig, "merging statistics against resolution and the Wilson plot")


#: Most marks a scatter plot draws; more points become a 2-D histogram (an embedded raster).
MAX_MARKS = 2000


def _hist2d(ax: Any, x: np.ndarray, y: np.ndarray, bins: int, x_range: tuple[float, float],
            y_range: tuple[float, float], label: str = "count") -> None:
    """A 2-D histogram as one raster image (log colour scale): the same few kB at any count."""
    from matplotlib.colors import LogNorm

    counts, xe, ye = np.histogram2d(x, y, bins=bins, range=(x_range, y_range))
    if counts.max() <= 0:
        return
    image = ax.imshow(np.where(counts > 0, counts, np.nan).T, origin="lower", aspect="auto",
                      extent=(xe[0], xe[-1], ye[0], ye[-1]), interpolation="nearest",
                      cmap="viridis", norm=LogNorm(vmin=1, vmax=max(counts.max(), 2)))
    # the colour bar beside the axes, not carved out of them: x axes stay aligned
    bar = ax.figure.colorbar(image, cax=ax.inset_axes((1.02, 0.0, 0.025, 1.0)))
    bar.set_label(label, fontsize=8)
    bar.ax.tick_params(labelsize=7)


def _span(v: np.ndarray, lo_pct: float = 0.5, hi_pct: float = 99.5,
          floor: float = 0.2) -> tuple[float, float]:
    lo, hi = (float(x) for x in np.percentile(v, [lo_pct, hi_pct]))
    pad = max(hi - lo, floor) * 0.08
    return lo - pad, hi + pad


def _spots_svg(d: Diagnostics) -> str:
    """Radial histogram of the spots (ice rings marked) over the peakogram, sharing 1/d²."""
    fig, axes = _figure(9.0, 5.9, nrows=2, right_in=1.0, hspace=0.5)
    fig.subplots_adjust(top=1.0 - 0.62 / 5.9)  # room for the ring labels and the title
    ax_hist, ax_peak = axes[0][0], axes[1][0]
    ok = np.isfinite(d.d_a) & (d.d_a > 0)
    inv_d2 = 1.0 / d.d_a[ok] ** 2
    indexed = d.indexed[ok]
    hi = float(np.percentile(inv_d2, 99.9)) * 1.05 if inv_d2.size else 0.1
    edges = np.linspace(0.0, hi, 161)
    all_counts, _ = np.histogram(inv_d2, bins=edges)
    idx_counts, _ = np.histogram(inv_d2[indexed], bins=edges)
    ax_hist.stairs(all_counts, edges, fill=True, color=_GREY, alpha=0.55, label="all found spots")
    ax_hist.stairs(idx_counts, edges, fill=True, color=_ORANGE, alpha=0.8, label="indexed spots")
    top = max(float(all_counts.max()) if all_counts.size else 1.0, 1.0)
    shown = [r for r in ICE_RINGS_A if 1.0 / r**2 <= hi]
    for i, ring in enumerate(shown):
        ax_hist.axvline(1.0 / ring**2, color=_BLUE, linewidth=0.8, linestyle=":",
                        label="hexagonal ice rings" if i == 0 else None)
    for ring in shown:  # above the axes, clear of the bars and the legend
        ax_hist.text(1.0 / ring**2, 1.01, f"{ring:g}", fontsize=6.5, color=_BLUE,
                     ha="center", va="bottom", rotation=90,
                     transform=ax_hist.get_xaxis_transform())
    ax_hist.set_ylim(0, top * 1.05)
    ax_hist.set_ylabel("spots")
    ax_hist.set_title("radial histogram of found spots (a peak on a dotted line: ice; "
                      "ring d in Å above)", fontsize=10, pad=24)
    ax_hist.legend(fontsize=7.5, loc="upper right", framealpha=0.9, edgecolor="none")
    inten = d.intensity[ok]
    pos = np.isfinite(inten) & (inten > 0)
    if pos.any():
        y = np.log10(inten[pos])
        if pos.sum() <= 4 * MAX_MARKS:  # few spots: each one, indexed ones in colour
            is_idx = indexed[pos]
            for mask, colour, label in ((~is_idx, _GREY, "not indexed"),
                                        (is_idx, _ORANGE, "indexed")):
                ax_peak.plot(inv_d2[pos][mask], y[mask], ".", color=colour, markersize=3,
                             alpha=0.6, rasterized=True, label=f"{label} ({int(mask.sum()):,})")
            ax_peak.legend(fontsize=7.5, loc="upper right", framealpha=0.9, edgecolor="none")
            ax_peak.set_ylim(*_span(y, 0.0, 100.0))
        else:
            _hist2d(ax_peak, inv_d2[pos], y, 120, (0.0, hi), _span(y, 0.1, 99.9), "spots")
    ax_peak.set_ylabel("log₁₀ spot intensity (ADU)")
    ax_peak.set_title("peakogram: spot intensity against resolution (a ceiling: saturation)",
                      fontsize=10)
    for ax in (ax_hist, ax_peak):
        ax.set_xlim(0.0, hi)
        _inv_d2_ticks(ax, edges)
    return _svg(fig, "radial histogram of found spots with ice rings, and peakogram")


#: Panels with fewer matched spots than this have their mean offsets drawn faint.
FEW_SPOTS = 5


def _signed(value: float) -> str:
    """Two decimals with a sign, and no "-0.00".

    >>> _signed(-0.001), _signed(0.804), _signed(-0.4)
    ('0.00', '+0.80', '-0.40')
    """
    text = f"{value:+.2f}"
    return "0.00" if text in ("+0.00", "-0.00") else text


def _offsets_svg(o: PanelOffsets) -> str:
    fig, axes = _figure(9.0, 2.9, right_in=0.3)
    ax = axes[0][0]
    from matplotlib.colors import to_rgba

    x = np.arange(o.panels.size)
    few = o.n < FEW_SPOTS  # a mean over a handful of spots is noise: drawn faint
    for shift, values, colour, label in ((-0.2, o.dfs_px, _BLUE, "fast scan (fs)"),
                                         (0.2, o.dss_px, _ORANGE, "slow scan (ss)")):
        ax.bar(x + shift, values, width=0.4, label=label,
               color=[to_rgba(colour, 0.3 if f else 1.0) for f in few])
    ax.axhline(0.0, color="#333333", linewidth=0.6)
    step = max(1, o.panels.size // 16)
    ax.set_xticks(x[::step])
    ax.set_xticklabels([str(p) for p in o.panels[::step]], fontsize=7)
    ax.set_xlabel("panel")
    ax.set_ylabel("found − predicted (px)")
    n = o.n.astype(float)
    mean_fs = float(np.sum(o.dfs_px * n) / n.sum())
    mean_ss = float(np.sum(o.dss_px * n) / n.sum())
    ax.set_title(f"mean spot-to-prediction offset per panel; all panels: fs {_signed(mean_fs)} "
                 f"px, ss {_signed(mean_ss)} px ({int(n.sum()):,} spots)", fontsize=9.5)
    lo = min(float(np.min(o.dfs_px)), float(np.min(o.dss_px)), 0.0)
    hi = max(float(np.max(o.dfs_px)), float(np.max(o.dss_px)), 0.0)
    pad = max(hi - lo, 0.2)
    ax.set_ylim(lo - 0.1 * pad, hi + 0.45 * pad)  # room for the legend above the bars
    ax.legend(fontsize=7.5, frameon=False, ncol=2, loc="upper right")
    return _svg(fig, "mean spot-to-prediction offset per panel")


_CELL_PAIRS = (("a", "c"), ("a", "b"), ("alpha", "gamma"), ("alpha", "beta"))


def _cell_scatter_svg(c: Crystals) -> str:
    from matplotlib.ticker import MaxNLocator

    fig, axes = _figure(9.0, 6.4, ncols=2, nrows=2, right_in=0.9, wspace=0.42, hspace=0.4)
    fig.subplots_adjust(top=1.0 - 0.5 / 6.4)  # room for the title above the top row
    n = len(c.cells["a"])
    for ax, (xn, yn) in zip(axes.ravel(), _CELL_PAIRS, strict=True):
        x, y = c.cells[xn], c.cells[yn]
        ok = np.isfinite(x) & np.isfinite(y)
        x, y = x[ok], y[ok]
        if x.size:
            xr, yr = _span(x, floor=0.5), _span(y, floor=0.5)
            if x.size <= MAX_MARKS:
                # one raster image of the dots: a few kB whatever their number
                ax.plot(x, y, ".", color=_BLUE, markersize=3, alpha=0.5, rasterized=True)
                ax.set_xlim(*xr)
                ax.set_ylim(*yr)
            else:
                _hist2d(ax, x, y, 80, xr, yr, "crystals")
        if c.target_cell is not None:
            tx = c.target_cell[CELL_NAMES.index(xn)]
            ty = c.target_cell[CELL_NAMES.index(yn)]
            ax.plot([tx], [ty], "+", color=_RED, markersize=14, markeredgewidth=1.5)
        if x.size and np.ptp(x) < 1e-6 and np.ptp(y) < 1e-6:
            ax.text(0.5, 0.88, f"all crystals at ({x[0]:.2f}, {y[0]:.2f}): fixed by the lattice",
                    transform=ax.transAxes, ha="center", fontsize=7.5, color="#333333")
        ax.set_xlabel(f"{xn} ({_CELL_UNITS[xn]})")
        ax.set_ylabel(f"{yn} ({_CELL_UNITS[yn]})")
        ax.ticklabel_format(useOffset=False)
        ax.xaxis.set_major_locator(MaxNLocator(5))
        ax.tick_params(labelsize=8)
    how = "one dot per crystal" if n <= MAX_MARKS else "crystals per bin, log colour"
    fig.suptitle(f"unit cells against each other ({how}; red +: the target cell): "
                 "separate clusters are different lattices or a wrong cell", fontsize=9.5)
    return _svg(fig, "unit cell scatter plots")


def _scaling_svg(sc: Scaling) -> str:
    present = [(k, v) for k, v in (("scale", sc.scale), ("B (Å²)", sc.b_a2),
                                   ("CC to the reference", sc.cc)) if v is not None]
    fig, axes = _figure(9.0, 3.0, ncols=len(present), wspace=0.35)
    for ax, (label, v) in zip(axes.ravel(), present, strict=True):
        ok = np.isfinite(v)
        if not ok.any():
            ax.set_title(f"{label}: no finite value", fontsize=9)
            continue
        edges = np.histogram_bin_edges(v[ok], bins=40, range=_span(v[ok], 0.5, 99.5, 1e-3))
        clipped = np.clip(v, edges[0], edges[-1])
        acc, _ = np.histogram(clipped[ok & sc.accepted], bins=edges)
        rej, _ = np.histogram(clipped[ok & ~sc.accepted], bins=edges)
        ax.stairs(acc, edges, fill=True, color=_BLUE, label=f"merged ({int(acc.sum()):,})")
        ax.stairs(acc + rej, edges, baseline=acc, fill=True, color=_RED, alpha=0.7,
                  label=f"rejected ({int(rej.sum()):,})")
        ax.set_xlabel(label)
        ax.set_title(f"{label}: median {np.median(v[ok & sc.accepted]) if (ok & sc.accepted).any() else math.nan:.3g}",
                     fontsize=9)
        ax.tick_params(labelsize=8)
    axes[0][0].set_ylabel("crystals")
    axes[0][0].legend(fontsize=7.5, frameon=False)
    return _svg(fig, "per-crystal scale, B factor and CC to the reference")


# ----------------------------------------------------------------------------------------------
# sections


def _cards(items: Sequence[tuple[str, str, str]]) -> str:
    cells = "".join(f'<div class="card"><div class="v">{_e(v)}</div><div class="k">{_e(k)}'
                    f'</div><div class="s">{_e(s)}</div></div>' for k, v, s in items)
    return f'<div class="cards">{cells}</div>'


def _table(head: Sequence[str], rows: Sequence[Sequence[Any]], numeric_from: int = 1,
           limit: int = 25) -> str:
    th = "".join(f"<th>{_e(h)}</th>" for h in head)
    body = []
    for row in rows[:limit]:
        tds = "".join(f'<td class="{"n" if i >= numeric_from else "t"}">{_e(v)}</td>'
                      for i, v in enumerate(row))
        body.append(f"<tr>{tds}</tr>")
    more = ""
    if len(rows) > limit:
        more = f'<p class="small">and {len(rows) - limit:,} more rows.</p>'
    return f"<table><thead><tr>{th}</tr></thead><tbody>{''.join(body)}</tbody></table>{more}"


def _overview_html(o: RunOverview) -> str:
    c = o.counts
    frames = c.get("frames", 0)
    cards = [
        ("frames", f"{frames:,}", f"blocks {o.blocks_done:,} of {o.blocks_total:,} done"),
        ("hits", f"{c.get('hits', 0):,}", f"{_pct(o.hit_rate)} of frames read"),
        ("indexed", f"{c.get('indexed', 0):,}", f"{_pct(o.indexing_rate)} of hits"),
        ("crystals", "–" if o.n_crystals is None else f"{o.n_crystals:,}",
         "" if o.n_crystals is None else "lattices found"),
        ("misses", f"{c.get('misses', 0):,}", ""),
        ("failed", f"{c.get('failed', 0):,}",
         f"{o.blocks_failed} block(s) failed" if o.blocks_failed else "frames"),
        ("wall time", _duration(o.wall_s), o.wall_note),
        ("throughput", "–" if o.frames_per_s is None else f"{o.frames_per_s:.3g} frames/s",
         "" if not o.n_cores else f"on {o.n_cores} core(s)"),
    ]
    parts = [_cards(cards)]
    parts.append("<h3>Failures by stage and reason</h3>")
    if o.failures:
        parts.append(_table(("stage", "reason", "frames"),
                            [(s or "–", r or "–", f"{n:,}") for s, r, n in o.failures],
                            numeric_from=2))
    else:
        parts.append('<p class="ok">no frame failed.</p>')
    if o.failed_blocks:
        parts.append("<h3>Blocks that failed as a whole (retried on the next run)</h3>")
        parts.append(_table(("block", "reason"), list(o.failed_blocks), numeric_from=2))
    parts.append("<h3>Throughput per worker over time</h3>")
    parts.append(_unavailable(o.throughput) if isinstance(o.throughput, Unavailable)
                 else _throughput_svg(o.throughput))
    if o.cost is None:
        return "".join(parts)
    parts.append("<h3>The same run at cloud prices</h3>")
    if isinstance(o.cost, Unavailable):
        parts.append(_unavailable(o.cost))
    else:
        rows = [(r.instance + ("*" if r.placeholder else ""), r.vcpus, f"{r.price_per_hour:.3f}",
                 r.n_nodes, _duration(r.wall_s), _money(r.cost_usd)) for r in o.cost]
        parts.append(_table(("instance", "vCPUs", "$/h per node", "nodes", "wall time",
                             "cost ($)"), rows, limit=60))
        if o.cost_note:
            parts.append(f'<p class="small">{_e(o.cost_note)}</p>')
    return "".join(parts)


def _along_html(a: AlongRun) -> str:
    return _along_svg(a) + "<h3>Spots per frame</h3>" + _spots_hist_svg(a)


def _crystals_html(c: Crystals) -> str:
    n = len(c.cells["a"])
    parts = [f'<p class="small">{n:,} crystals, {_e(c.source)}'
             + ("; dashed red: the target cell" if c.target_cell is not None else "") + ".</p>",
             _cells_svg(c), "<h3>Cells against each other</h3>", _cell_scatter_svg(c),
             '<div class="row">']
    for title, item, draw in (("Resolution limit", c.resolution_limit_a, _resolution_svg),
                              ("Crystals per frame", c.crystals_per_frame, _per_frame_svg)):
        inner = _unavailable(item) if isinstance(item, Unavailable) else draw(item)
        parts.append(f'<div class="half"><h3>{title}</h3>{inner}</div>')
    parts.append("</div>")
    return "".join(parts)


def _shell_rows(stats: Mapping[str, Any]) -> list[list[str]]:
    rows = []
    shells = [*list(stats.get("shells") or []), None, stats.get("overall")]
    for s in shells:
        if s is None:
            continue
        d_max = s.get("d_max_a")
        name = (f"{'∞' if d_max is None or not math.isfinite(float(d_max)) else f'{d_max:.2f}'}"
                f" – {float(s.get('d_min_a', math.nan)):.2f}")
        if s is stats.get("overall"):
            name = "overall " + name
        rows.append([name, f"{int(s.get('n_obs') or 0):,}", f"{int(s.get('n_unique') or 0):,}",
                     _pct(s.get("completeness")), _num(s.get("multiplicity"), 3),
                     _num(s.get("mean_i_over_sigma"), 3), _num(s.get("cc_half"), 3),
                     _num(s.get("cc_star"), 3), _num(s.get("r_split"), 3)])
    return rows


def _estimate_html(m: Merged) -> str:
    if not m.resolution_estimate:
        return ('<p class="small">resolution estimate: none in stats.json (read from the '
                "curves below).</p>")
    return _cards([(label, f"{v:.2f} Å", "resolution estimate")
                   for label, v in m.resolution_estimate])


def _merged_html(m: Merged, full: bool = True) -> str:
    st = m.stats
    cell = st.get("cell")
    cell_text = " ".join(f"{v:.2f}" for v in cell) if cell else "–"
    rejected = st.get("rejected") or {}
    rej_text = ", ".join(f"{k}: {v}" for k, v in rejected.items() if v) or "none"
    head = (f'<p class="small">{_e(m.source)}: space group {_e(st.get("space_group", "–"))}, '
            f"cell {_e(cell_text)}, model {_e(st.get('model', '–'))}, "
            f"{int(st.get('n_crystals_merged') or 0):,} of "
            f"{int(st.get('n_crystals_input') or 0):,} crystals merged (rejected: "
            f"{_e(rej_text)}).</p>")
    plots = _merged_svg(m) if st.get("shells") else _unavailable(
        Unavailable("stats.json has no resolution shells"))
    if not full:
        return head + _estimate_html(m) + plots
    table = _table(("shell d (Å)", "obs", "unique", "completeness", "multiplicity", "I/σ",
                    "CC1/2", "CC*", "Rsplit"), _shell_rows(st), limit=60)
    return head + _estimate_html(m) + plots + table


def _diagnostics_html(d: Diagnostics) -> str:
    parts = [f'<p class="small">{_e(d.source)}; resolution from each spot\'s position and the '
             "geometry.</p>", _spots_svg(d), "<h3>Detector: spots against predictions</h3>"]
    if isinstance(d.offsets, Unavailable):
        parts.append(_unavailable(d.offsets))
    else:
        parts.append(_offsets_svg(d.offsets))
        refined = d.offsets.refined
        parts.append('<p class="small">Indexed spots matched to the predicted position of their '
                     f"h k l on the same frame (faint bars: fewer than {FEW_SPOTS} spots). "
                     "Offsets of the same sign on every panel: the beam centre (detector "
                     "shift) is off; offsets growing outwards: the distance. "
                     + ("Refined by the run: " + ", ".join(f"{k} {v:.3f}"
                                                           for k, v in refined.items())
                        if refined else "This run refines neither the distance nor the "
                        "detector position: the geometry file's values were used.") + "</p>")
    return "".join(parts)


def _scaling_html(sc: Scaling) -> str:
    n = len(sc.accepted)
    missing = [k for k, v in (("scale", sc.scale), ("B factor", sc.b_a2),
                              ("CC to the reference", sc.cc)) if v is None]
    parts = [f'<p class="small">{n:,} crystals in {_e(sc.source)}: '
             f"{int(sc.accepted.sum()):,} merged, {n - int(sc.accepted.sum()):,} rejected.</p>"]
    if len(missing) < 3:
        parts.append(_scaling_svg(sc))
    if missing:
        parts.append(f'<p class="na">not available: the merge wrote no {", ".join(missing)} '
                     "column.</p>")
    parts.append("<h3>Rejections by reason</h3>")
    if sc.reasons:
        parts.append(_table(("reason", "crystals"), [(r, f"{c:,}") for r, c in sc.reasons]))
    else:
        parts.append('<p class="ok">no crystal rejected.</p>')
    return "".join(parts)


def _picture_png(p: FramePicture) -> bytes:
    """The frame drawn once (a live refresh reuses the same FramePicture and so its PNG)."""
    if p.png is None:
        from sfxflow.report.picture import render_frame_png

        with tempfile.TemporaryDirectory(prefix="sfxflow-report-") as tmp:
            path = os.path.join(tmp, "frame.png")
            render_frame_png(p.frame, path, spots=p.spots, predicted=p.predicted, title=p.title,
                             max_size_px=1200, dpi=130, low_percentile=90.0,
                             high_percentile=99.98)
            with open(path, "rb") as f:
                p.png = f.read()
    return p.png


def _picture_html(p: FramePicture) -> str:
    data = base64.b64encode(_picture_png(p)).decode("ascii")
    return (f'<figure class="picture"><img alt="{_e(p.caption)}" '
            f'src="data:image/png;base64,{data}"><figcaption>{_e(p.caption)}</figcaption>'
            "</figure>")


_CSS = """
:root { color-scheme: light; }
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", "DejaVu Sans", sans-serif;
  margin: 0; color: #1d232a; background: #f6f7f9; }
header { background: #1d2b3a; color: #fff; padding: 14px 28px; }
header h1 { margin: 0 0 4px; font-size: 21px; }
header .meta { font-size: 13px; color: #c8d3df; word-break: break-all; }
.state { display: inline-block; padding: 1px 9px; border-radius: 10px; font-weight: 600;
  font-size: 12px; margin-left: 8px; }
.state.running { background: #f2c14e; color: #3d2c00; }
.state.done { background: #6fcf97; color: #0b3b20; }
nav { padding: 8px 28px; background: #e8edf2; font-size: 14px; }
nav a { margin-right: 16px; color: #1d4e89; text-decoration: none; }
nav a.other { float: right; margin-right: 0; font-weight: 600; }
main { max-width: 1000px; margin: 0 auto; padding: 8px 20px 40px; }
section { background: #fff; border: 1px solid #dde3ea; border-radius: 6px; padding: 6px 22px 16px;
  margin: 18px 0; }
h2 { font-size: 19px; border-bottom: 1px solid #e5e9ee; padding-bottom: 5px; }
h3 { font-size: 15px; margin: 18px 0 6px; color: #33414f; }
.cards { display: grid; grid-template-columns: repeat(4, 1fr); gap: 10px; }
.card { background: #f3f6f9; border-radius: 6px; padding: 8px 12px; }
.card .v { font-size: 21px; font-weight: 650; }
.card .k { font-size: 12px; text-transform: uppercase; letter-spacing: .04em; color: #5a6978; }
.card .s { font-size: 12px; color: #5a6978; min-height: 1em; }
table { border-collapse: collapse; font-size: 13px; margin: 4px 0; }
th, td { padding: 3px 10px; border-bottom: 1px solid #e9edf1; }
th { text-align: left; background: #f3f6f9; }
td.n { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td.t { max-width: 640px; overflow-wrap: anywhere; }
figure { margin: 6px 0; }
figure.plot svg { width: 100%; height: auto; display: block; }
figure.picture img { max-width: 100%; height: auto; display: block; margin: 0 auto; }
figcaption { font-size: 13px; color: #5a6978; text-align: center; }
.row { display: flex; gap: 16px; flex-wrap: wrap; }
.half { flex: 1 1 420px; min-width: 0; }
.na { color: #7a5d00; background: #fff7dc; border-left: 3px solid #f2c14e; padding: 6px 10px; }
.ok { color: #0b5a2a; }
.small, footer { font-size: 12.5px; color: #5a6978; }
footer { text-align: center; padding: 10px; }
"""

_SECTIONS = (
    ("overview", "Run overview"),
    ("along", "Along the run"),
    ("spots", "Spots and detector"),
    ("crystals", "Crystals"),
    ("merged", "Merged data"),
    ("scaling", "Per-crystal scaling"),
    ("frame", "Strongest frame"),
)
#: the page's sections, in its order
SECTION_KEYS = tuple(k for k, _ in _SECTIONS)


def _bodies(data: ReportData) -> dict[str, Any]:
    return {
        "overview": data.overview, "along": data.along, "spots": data.diagnostics,
        "crystals": data.crystals, "merged": data.merged, "scaling": data.scaling,
        "frame": data.picture,
    }


def render_sections(data: ReportData, keys: Collection[str] | None = None) -> dict[str, str]:
    """The inner HTML of the page's sections (:data:`SECTION_KEYS`; those of ``keys`` only),
    by key; a section the page leaves out (``None`` in ``data``) has none."""
    full = data.kind == "merge"
    renderers: dict[str, Any] = {
        "overview": _overview_html, "along": _along_html, "spots": _diagnostics_html,
        "crystals": _crystals_html, "merged": lambda m: _merged_html(m, full),
        "scaling": _scaling_html, "frame": _picture_html,
    }
    inner = {}
    for key, item in _bodies(data).items():
        if item is None or (keys is not None and key not in keys):
            continue
        inner[key] = _unavailable(item) if isinstance(item, Unavailable) else renderers[key](item)
    return inner


def render_report_html(data: ReportData, sections: Mapping[str, str] | None = None) -> str:
    """The whole page as a string (UTF-8, no external references).

    ``sections``: the inner HTML of some sections, drawn already (:func:`render_sections`);
    the others are drawn here.

    Examples
    --------
    >>> page = render_report_html(ReportData(
    ...     title="run", run_url="/data/run", state="no blocks done yet", running=True,
    ...     generated_at="2026-01-01 00:00 UTC", overview=Unavailable("no frames yet"),
    ...     along=Unavailable("no frames yet"), crystals=Unavailable("no crystals yet"),
    ...     merged=Unavailable("no merged data in this run"),
    ...     picture=Unavailable("no indexed frame yet")))
    >>> "not available: no merged data in this run" in page, "://" in page
    (True, False)
    """
    bodies = _bodies(data)
    present = [(k, t) for k, t in _SECTIONS if bodies[k] is not None]
    drawn = dict(sections or {})
    drawn.update(render_sections(data, [k for k, _ in present if k not in drawn]))
    sections_html = [f'<section id="{key}"><h2>{_e(title)}</h2>{drawn[key]}</section>'
                     for key, title in present]
    nav = "".join(f'<a href="#{k}">{_e(t)}</a>' for k, t in present)
    if data.link is not None:
        nav += f'<a class="other" href="{_e(data.link[0])}">{_e(data.link[1])} →</a>'
    refresh = (f'<meta http-equiv="refresh" content="{int(data.refresh_s)}">'
               if data.running and data.refresh_s > 0 else "")
    state_class = "running" if data.running else "done"
    notes = "".join(f'<p class="na">{_e(n)}</p>' for n in data.notes)
    live = (f" This page reloads itself every {int(data.refresh_s)} s while the run goes."
            if refresh else "")
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"{refresh}<title>{_e(data.title)}</title><style>{_CSS}</style></head><body>"
        f'<header><h1>{_e(data.title)}<span class="state {state_class}">{_e(data.state)}</span>'
        f'</h1><div class="meta">{_e(data.run_url)} · report made {_e(data.generated_at)}'
        f"{_e(live)}</div></header><nav>{nav}</nav><main>{notes}{''.join(sections_html)}</main>"
        f"<footer>sfxflow {_e(data.version)} · one self-contained page: no scripts, nothing "
        "fetched from anywhere</footer></body></html>\n"
    )
