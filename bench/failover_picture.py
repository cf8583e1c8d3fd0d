"""The picture of a measured failover run (issue 9): per-director traffic over time, and every connection's
answers, with the moments a director left and rejoined the router's route.  Pure: recording in, SVG text out.

The SVG is written by hand (a few hundred elements of text) rather than with a plotting library: nothing
in the project plots, and matplotlib would be a large dependency for one figure.

    python bench/failover_picture.py RUN.json OUT.svg    (RUN.json as written by bench/failover.py)
"""

from __future__ import annotations

import json
import sys
from html import escape
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.harness.traffic import Recording  # noqa: E402

WIDTH, LEFT, RIGHT = 960, 70, 20
TOP_H, ROW_H, GAP_H = 170, 5, 50
DIRECTOR_COLOURS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd"]
BACKEND_COLOURS = ["#4c72b0", "#55a868", "#8172b2", "#ccb974", "#64b5cd", "#937860"]  # no red: gaps
BREAK = 0.3
"""An answer later than this after the previous one is drawn as a gap (the connections ask every 0.1 s)."""


def rates(samples: list[tuple[float, int]], window: float = 0.5) -> list[tuple[float, float]]:
    """Packets per second received, over consecutive windows of about `window` seconds."""
    out: list[tuple[float, float]] = []
    last_t, last_n = samples[0] if samples else (0.0, 0)
    for t, n in samples[1:]:
        if t - last_t >= window:
            out.append(((t + last_t) / 2, (n - last_n) / (t - last_t)))
            last_t, last_n = t, n
    return out


def picture(rec: Recording, events: list[tuple[float, str]], title: str, lo: float, hi: float) -> str:
    """SVG of the recording between monotonic times lo and hi."""
    plot_w = WIDTH - LEFT - RIGHT
    rows = sorted(rec.flows, key=lambda f: (f.backend, f.sport))
    height = 30 + TOP_H + GAP_H + len(rows) * ROW_H + 60

    def x(t: float) -> float:
        return LEFT + (t - lo) / (hi - lo) * plot_w

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" '
           f'font-family="sans-serif" font-size="11">',
           f'<rect width="{WIDTH}" height="{height}" fill="white"/>',
           f'<text x="{LEFT}" y="18" font-size="14" font-weight="bold">{escape(title)}</text>']
    # per-director traffic
    top0 = 30
    series = {label: [(t, r) for t, r in rates(s) if lo <= t <= hi] for label, s in sorted(rec.samples.items())}
    peak = max([r for s in series.values() for _, r in s] + [1.0])
    out.append(f'<text x="{LEFT}" y="{top0 + 10}">packets/s received by each director</text>')
    for i, (label, points) in enumerate(series.items()):
        colour = DIRECTOR_COLOURS[i % len(DIRECTOR_COLOURS)]
        path = " ".join(f"{x(t):.1f},{top0 + TOP_H - r / peak * (TOP_H - 20):.1f}" for t, r in points)
        out.append(f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="{path}"/>')
        out.append(f'<text x="{WIDTH - RIGHT - 40}" y="{top0 + 24 + 14 * i}" fill="{colour}">{label}</text>')
    out.append(f'<text x="{LEFT - 6}" y="{top0 + 24}" text-anchor="end">{peak:.0f}</text>')
    out.append(f'<text x="{LEFT - 6}" y="{top0 + TOP_H}" text-anchor="end">0</text>')
    out.append(f'<line x1="{LEFT}" y1="{top0 + TOP_H}" x2="{WIDTH - RIGHT}" y2="{top0 + TOP_H}" stroke="#999"/>')
    # every connection's answers: a bar while it answers every 0.1 s, red where it waited longer
    rows0 = top0 + TOP_H + GAP_H
    backends = sorted({f.backend for f in rows})
    out.append(f'<text x="{LEFT}" y="{rows0 - 8}">each of {len(rows)} connections (one row each, coloured by '
               f'its backend; red: no answer for more than {BREAK:g} s; black: reset; grey: the recorder itself '
               f'was not scheduled)</text>')
    for row, flow in enumerate(rows):
        y = rows0 + row * ROW_H
        colour = BACKEND_COLOURS[backends.index(flow.backend) % len(BACKEND_COLOURS)]
        times = [t for t in flow.answers if lo <= t <= hi]
        start = prev = times[0] if times else lo
        for t in [*times[1:], None]:
            if t is None or t - prev > BREAK:
                out.append(f'<rect x="{x(start):.1f}" y="{y}" width="{max(x(prev) - x(start), 1):.1f}" '
                           f'height="{ROW_H - 1}" fill="{colour}"/>')
                if t is not None:
                    out.append(f'<rect x="{x(prev):.1f}" y="{y}" width="{x(t) - x(prev):.1f}" '
                               f'height="{ROW_H - 1}" fill="#d62728"/>')
                    start = t
            if t is not None:
                prev = t
        if flow.reset is not None and lo <= flow.reset <= hi:
            out.append(f'<rect x="{x(flow.reset):.1f}" y="{y}" width="{x(hi) - x(flow.reset):.1f}" '
                       f'height="{ROW_H - 1}" fill="black"/>')
    for a, b in rec.stalls:  # the recorder itself was not running: no answer could be read, whatever the network did
        if b > lo and a < hi:
            out.append(f'<rect x="{x(max(a, lo)):.1f}" y="{rows0}" width="{x(min(b, hi)) - x(max(a, lo)):.1f}" '
                       f'height="{len(rows) * ROW_H}" fill="#888" fill-opacity="0.45"/>')
    for i, b in enumerate(backends):
        out.append(f'<text x="{WIDTH - RIGHT - 40 * (len(backends) - i)}" y="{rows0 - 24}" '
                   f'fill="{BACKEND_COLOURS[i % len(BACKEND_COLOURS)]}">{b}</text>')
    bottom = rows0 + len(rows) * ROW_H
    # time axis and events
    for s in range(int(hi - lo) + 1):
        out.append(f'<line x1="{x(lo + s):.1f}" y1="{bottom}" x2="{x(lo + s):.1f}" y2="{bottom + 4}" stroke="#333"/>')
        out.append(f'<text x="{x(lo + s):.1f}" y="{bottom + 16}" text-anchor="middle">{s}</text>')
    out.append(f'<text x="{LEFT + plot_w / 2}" y="{bottom + 32}" text-anchor="middle">seconds</text>')
    for i, (t, label) in enumerate(events):
        if lo <= t <= hi:
            out.append(f'<line x1="{x(t):.1f}" y1="{top0 + 16}" x2="{x(t):.1f}" y2="{bottom}" stroke="#444" '
                       f'stroke-dasharray="4,3"/>')
            out.append(f'<text x="{x(t) + 3:.1f}" y="{top0 + 26 + 12 * (i % 4)}">{escape(label)}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def main(argv: list[str]) -> int:
    run = json.loads(Path(argv[0]).read_text())
    rec = Recording.load(Path(argv[0]).parent / run["recording"])
    events = [(t, label) for t, label in run["events"]]
    lo = max(rec.start, events[0][0] - 3)
    hi = min(rec.end, events[-1][0] + 3)
    Path(argv[1]).write_text(picture(rec, events, run["title"], lo, hi))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
