"""``sfxflow report``: the run report, one self-contained HTML page (see sfxflow.report)."""

from __future__ import annotations

import argparse
import sys

from sfxflow.errors import InputError

HELP = "write a run's report: one self-contained HTML page with plots (works while it runs)"
DESCRIPTION = HELP + """

Sections: run overview (frames, hits, indexed, crystals, failures by stage and reason,
throughput per worker over time, wall time; the run's cost at cloud prices for a run on object
storage or with --cost); along the run (hit and indexing rate per block, spots per frame);
spots (peakogram, radial histogram with the ice rings, spot-to-prediction offset per panel);
crystals (unit-cell histograms and scatter plots, resolution limits, crystals per frame);
merged data (resolution estimate, CC1/2, CC*, completeness, multiplicity, I/sigma against
resolution, Wilson plot) when RUN/merge/stats.json exists; and a picture of the strongest
indexed frame with its spots and predictions. The merge folder has a page of its own
(per-crystal scale, B, CC to the reference, rejections, the shell table). A part the run does not
have yet says so in its place. The page has no scripts and fetches nothing: it opens offline.
`sfxflow process` writes RUN/report.html itself and refreshes it while the run goes.

Examples:
  sfxflow report results/run1                       # writes results/run1/report.html
  sfxflow report results/run1 --out /tmp/run1.html
  sfxflow report s3://bucket/out7 --endpoint-url http://127.0.0.1:9000 --out run7.html
  sfxflow report results/run1 --screenshot run1.png # a PNG of the whole page (needs chromium)
  sfxflow report results/run1 --cost                # also price the run on cloud instances
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", metavar="RUN", help="run directory (path or s3:// URL)")
    parser.add_argument("--out", "-o", metavar="HTML",
                        help="where to write the page (default RUN/report.html)")
    parser.add_argument("--merge", metavar="DIR",
                        help="sfxflow merge output folder (default RUN/merge)")
    parser.add_argument("--no-picture", action="store_true",
                        help="do not draw the strongest frame (it reads one image file)")
    parser.add_argument("--cost", action=argparse.BooleanOptionalAction, default=None,
                        help="price the run on cloud instances (default: only for a run whose "
                        "directory or inputs are on object storage)")
    parser.add_argument("--screenshot", metavar="PNG",
                        help="also save a full-page PNG, rendered by headless chromium")
    parser.add_argument("--endpoint-url", metavar="URL", help="S3-compatible endpoint")
    parser.add_argument("--profile", metavar="NAME", help="AWS profile")


def run(args: argparse.Namespace) -> int:
    from sfxflow.io.arrow import pyarrow_without_pandas
    from sfxflow.io.storage import is_local, storage_options_from

    pyarrow_without_pandas()  # before the first Arrow array: this process needs no pandas
    from sfxflow.report.page import write_report

    options = storage_options_from(args.endpoint_url, args.profile)
    written = write_report(args.run, args.out, storage_options=options, merge_url=args.merge,
                           with_picture=not args.no_picture, cost=args.cost)
    print(f"wrote {written}")
    if args.screenshot:
        from sfxflow.report.headless import BrowserError, render_page

        if not is_local(written):
            raise InputError("--screenshot needs a local --out file (chromium opens it from disk)")
        try:
            result = render_page(written, screenshot=True)
        except BrowserError as exc:
            raise InputError(f"--screenshot: {exc}") from None
        assert result.screenshot_png is not None
        with open(args.screenshot, "wb") as f:
            f.write(result.screenshot_png)
        print(f"wrote {args.screenshot} ({result.width_px} x {result.height_px} px)")
        for problem in result.problems():
            print(f"browser: {problem}", file=sys.stderr)
    return 0
