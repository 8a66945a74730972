#!/usr/bin/env python3
"""Render a Chrome-format trace (from GET /debug/traces?format=chrome, or
``agile-rag-trace --chrome out.json``) as a PNG timeline: one row per actor, a bar per message,
coloured by what the time was: queued (in the mailbox), compute, grant (waiting for GPU memory),
admit (weights copied host -> GPU), evict (GPU copy dropped), control messages, model loads;
plus a row of HTTP requests.

    agile-rag-trace --url http://127.0.0.1:8000 --chrome /tmp/trace.json --since 60
    python benchmarks/trace_timeline.py /tmp/trace.json -o benchmarks/results/trace.png

matplotlib is needed here only (it is not a dependency of the server): pip install matplotlib.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

COLOURS = {
    "queue": "#c8c8c8", "compute": "#1f77b4", "grant": "#ff7f0e", "admit": "#d62728",
    "evict": "#9467bd", "http": "#2ca02c", "load": "#8c564b", "control": "#7f7f7f",
}
LABELS = {
    "queue": "queued (mailbox)", "compute": "compute", "grant": "GPU grant wait",
    "admit": "admit (host->GPU copy)", "evict": "evict (drop GPU copy)", "http": "HTTP request",
    "load": "model load", "control": "control message",
}


def load_trace(path: str) -> dict:
    """Rows (actor tracks), slices and async spans of a Chrome trace-event JSON file."""
    with open(path) as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    names, order = {}, {}
    for e in events:
        if e.get("ph") == "M" and e.get("name") == "thread_name":
            names[e["tid"]] = e["args"]["name"]
        elif e.get("ph") == "M" and e.get("name") == "thread_sort_index":
            order[e["tid"]] = e["args"]["sort_index"]
    slices = [e for e in events if e.get("ph") == "X"]
    opened, spans = {}, []
    for e in events:
        if e.get("ph") == "b":
            opened[(e.get("cat"), e.get("name"), e.get("id"))] = e
        elif e.get("ph") == "e":
            b = opened.pop((e.get("cat"), e.get("name"), e.get("id")), None)
            if b is not None:
                spans.append({**b, "dur": e["ts"] - b["ts"]})
    return {"names": names, "order": order, "slices": slices, "spans": spans,
            "other": data.get("otherData", {}) if isinstance(data, dict) else {}}


def _window(tr: dict, spec: str) -> tuple[float, float]:
    items = tr["slices"] + tr["spans"]
    if not items:
        return 0.0, 1.0
    if spec not in ("auto", "all"):
        lo, hi = (float(x) * 1e6 for x in spec.split(":"))
        return lo, hi
    if spec == "auto":      # what requests did: skip model loads and idle polling before them
        busy = [e for e in tr["slices"] + tr["spans"] if e.get("cat") != "http"
                and (e.get("args") or {}).get("request_id")]
        if busy:
            lo = min(e["ts"] for e in busy)
            hi = max(e["ts"] + e["dur"] for e in busy)
            pad = (hi - lo) * 0.03 or 1000.0
            return lo - pad, hi + pad
    return min(e["ts"] for e in items), max(e["ts"] + e["dur"] for e in items)


def _fmt_bytes(n) -> str:
    try:
        n = float(n)
    except (TypeError, ValueError):
        return ""
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


def render(path: str, out: str, *, window: str = "auto", title: str | None = None,
           hide: tuple[str, ...] = ()) -> dict:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    tr = load_trace(path)
    lo, hi = _window(tr, window)
    tids = sorted((t for t, n in tr["names"].items() if n not in hide),
                  key=lambda t: tr["order"].get(t, t))
    row = {t: i for i, t in enumerate(tids)}
    used: set[str] = set()
    height = max(2.2, 0.55 * len(tids) + 1.4)
    fig, ax = plt.subplots(figsize=(14, height))

    def visible(e) -> bool:
        return e["ts"] + e["dur"] >= lo and e["ts"] <= hi and e.get("tid") in row

    def bar(e, kind: str, y0: float, h: float, alpha: float = 1.0, z: int = 2,
            edge: bool = False) -> None:
        used.add(kind)
        x = (e["ts"] - lo) / 1e6
        w = max(e["dur"] / 1e6, (hi - lo) / 1e6 / 2000)    # a message too short to see: a tick
        ax.broken_barh([(x, w)], (y0, h), facecolors=COLOURS.get(kind, "#333333"), alpha=alpha,
                       zorder=z, edgecolor="white" if edge else "none",
                       linewidth=0.6 if edge else 0)

    for e in tr["spans"]:
        if not visible(e):
            continue
        y = row[e["tid"]]
        if e.get("cat") == "queue":
            bar(e, "queue", y - 0.38, 0.18, alpha=0.6, z=1)
        elif e.get("cat") == "http":
            bar(e, "http", y - 0.3, 0.6, alpha=0.25, z=1)
        else:                                  # a deferred reply drawn as an async slice
            bar(e, e.get("cat", "control"), y - 0.15, 0.45, alpha=0.5, z=1)
    phase_cats = ("grant", "admit", "compute", "evict")
    for e in sorted(tr["slices"], key=lambda s: -s["dur"]):     # parents first, phases on top
        if not visible(e):
            continue
        y = row[e["tid"]]
        args = e.get("args") or {}
        is_phase = "actor" not in args and e.get("cat") in phase_cats
        kind = e.get("cat", "control")
        bar(e, kind, y - 0.15, 0.45, z=3 if is_phase else 2, edge=not is_phase)
        label = None
        if kind == "admit" and "admit_bytes" in args:
            label = f"admit {_fmt_bytes(args['admit_bytes'])} {args.get('admit_s', 0):.3g}s"
        elif kind == "evict" and "evict_s" in args and (is_phase or args.get("msg") == "Revoke"):
            label = f"evict {args['evict_s'] * 1000:.3g} ms"
        if label:
            ax.annotate(label, ((e["ts"] - lo) / 1e6, y + 0.33), fontsize=7,
                        color=COLOURS[kind], zorder=5)
    ax.set_yticks(range(len(tids)))
    ax.set_yticklabels([tr["names"][t] for t in tids])
    ax.set_ylim(len(tids) - 0.4, -0.6)
    ax.set_xlim(0, (hi - lo) / 1e6)
    ax.set_xlabel("seconds")
    ax.grid(axis="x", alpha=0.3)
    order = ["queue", "grant", "admit", "compute", "evict", "http", "control", "load"]
    ax.legend(handles=[Patch(color=COLOURS[k], label=LABELS[k]) for k in order if k in used],
              loc="upper center", bbox_to_anchor=(0.5, -0.14 if len(tids) > 3 else -0.3),
              ncol=4, fontsize=8, frameon=False)
    ax.set_title(title or f"actor timeline: {os.path.basename(path)}", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=130)
    plt.close(fig)
    return {"rows": [tr["names"][t] for t in tids], "kinds": sorted(used),
            "window_s": [lo / 1e6, hi / 1e6]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("trace", help="Chrome trace-event JSON (GET /debug/traces?format=chrome)")
    p.add_argument("-o", "--out", help="PNG to write (default: the trace's name with .png)")
    p.add_argument("--window", default="auto",
                   help="'auto' (the span of request work), 'all', or 'T0:T1' seconds")
    p.add_argument("--hide", action="append", default=[],
                   help="an actor row to leave out (repeatable), e.g. --hide config")
    p.add_argument("--title")
    args = p.parse_args(argv)
    out = args.out or os.path.splitext(args.trace)[0] + ".png"
    info = render(args.trace, out, window=args.window, title=args.title, hide=tuple(args.hide))
    print(f"wrote {out}: rows {', '.join(info['rows'])}; kinds {', '.join(info['kinds'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
