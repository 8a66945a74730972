"""`agile-rag-trace` / `python -m agile_rag.tracecli`: read a running server's actor traces.

    agile-rag-trace --request-id my-req-1            # one request's timeline, as text
    agile-rag-trace --chrome trace.json --since 60   # the last minute, for Perfetto / chrome://tracing
    agile-rag-trace --since 10                       # the last 10 s, one line per event

The request id is the ``x-request-id`` header of the response (send your own to choose it).
(Not named ``trace.py``: run from the repository root, a top-level ``trace`` module would shadow
the standard library's ``trace``.)
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request

PHASE_MARK = {"grant": "g", "admit": "A", "compute": "#", "evict": "E", "http": "=",
              "load": "L", "control": "c"}


def fetch(url: str, path: str, params: dict, key: str | None, timeout: float = 30.0) -> bytes:
    query = urllib.parse.urlencode({k: v for k, v in params.items() if v is not None})
    req = urllib.request.Request(url.rstrip("/") + path + ("?" + query if query else ""))
    if key:
        req.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.read()
    except urllib.error.HTTPError as exc:
        body = exc.read()
        try:
            message = json.loads(body)["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = body.decode("utf-8", "replace")[:300]
        raise SystemExit(f"agile-rag-trace: {exc.code} from {url}: {message}") from None
    except OSError as exc:
        raise SystemExit(f"agile-rag-trace: cannot reach {url}: {exc}") from None


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:9.1f} ms"


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def _detail(d: dict | None, limit: int = 70) -> str:
    if not d:
        return ""
    text = " ".join(f"{k}={v}" for k, v in d.items())
    return text if len(text) <= limit else text[:limit - 1] + "…"


def format_timeline(data: dict, width: int = 40) -> str:
    """One request's timeline as text: where the time went, then each message on a bar."""
    t = data["timeline"]
    events = data["events"]
    lines = [f"request {data['request_id']}"
             + (f"  {t['route']}" if t.get("route") else "")
             + (f"  model {', '.join(t['models'])}" if t.get("models") else "")
             + (f"  status {t['status']}" if t.get("status") is not None else "")
             + f"  {t['outcome']}",
             f"  total        {_ms(t['total_s'])}",
             f"  queue wait   {_ms(t['queue_s'])}   (in the model's mailbox)",
             f"  grant wait   {_ms(t['grant_wait_s'])}   (for GPU memory from the VRAM arbiter)",
             f"  swap in      {_ms(t['swap_in_s'])}   ({_size(t['swap_in_bytes'])} copied to "
             f"the GPU)",
             f"  evict        {_ms(t['evict_s'])}"
             + (f"   (evicted: {', '.join(t['evicted'])})" if t.get("evicted") else ""),
             f"  compute      {_ms(t['compute_s'])}"
             + (f"   (prompt read in {t['prefill_chunks']} chunks)"
                if t.get("prefill_chunks") else ""),
             *([f"  paused       {t['paused']} time(s)   (the chat batch gave the GPU to "
                f"another model or ran out of KV cache; it went on where it was)"]
               if t.get("paused") else []),
             f"  reply/stream {_ms(t['reply_s'])}   (after the model finished)",
             ""]
    span = max((e["end_at_s"] for e in events), default=0.0) or 1e-9
    lines.append(f"  {'at (ms)':>9}  {'actor':<16} {'message':<26} {'queued':>9} {'ran':>9}  "
                 f"{'timeline':<{width}}  outcome / detail")
    for e in events:
        bar = [" "] * width
        a = int(e["at_s"] / span * (width - 1))
        s = int(e["start_at_s"] / span * (width - 1))
        for i in range(a, s):
            bar[i] = "."
        pos = e["start_at_s"]
        for name, secs in (e.get("phases") or {}).items():
            lo = int(pos / span * (width - 1))
            pos += secs
            hi = max(int(pos / span * (width - 1)), lo)
            for i in range(lo, hi + 1):
                bar[min(i, width - 1)] = PHASE_MARK.get(name, "#")
        detail = {k: v for k, v in (e.get("detail") or {}).items() if k != "path"}
        lines.append(f"  {e['at_s'] * 1000:9.1f}  {e['actor'][:16]:<16} {e['msg'][:26]:<26} "
                     f"{e['queue_s'] * 1000:7.1f}ms {e['run_s'] * 1000:7.1f}ms  "
                     f"{''.join(bar)}  {e['outcome']} {_detail(detail)}".rstrip())
    lines.append("")
    lines.append("  bars: . queued  g grant wait  A admit (swap in)  # compute  E evict  "
                 "= http request")
    return "\n".join(lines)


def format_events(data: dict) -> str:
    rows = [f"{data['count']} event(s) in the last {data['since_s']:g} s"]
    for e in data["events"]:
        rows.append(f"{e['wall']}  {e['actor'][:16]:<16} {e['msg'][:26]:<26} "
                    f"{(e['request_id'] or '-')[:28]:<28} q {e['queue_s'] * 1000:7.1f}ms "
                    f"run {e['run_s'] * 1000:8.1f}ms  {e['outcome']} {_detail(e.get('detail'))}"
                    .rstrip())
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="agile-rag-trace",
        description="Read a running AgileRagServer's actor traces: one request's timeline "
                    "(queue wait, grant wait, swap, compute, reply) or a window of time exported "
                    "for Perfetto / chrome://tracing.")
    p.add_argument("--url", default=os.environ.get("AGILE_RAG_URL", "http://127.0.0.1:8000"),
                   help="the server's base URL (default %(default)s; env AGILE_RAG_URL)")
    p.add_argument("--api-key", default=os.environ.get("AGILE_RAG_API_KEY"),
                   help="Bearer key when the server sets API_KEYS (env AGILE_RAG_API_KEY)")
    p.add_argument("--request-id", "-r", metavar="ID",
                   help="print this request's timeline (the response's x-request-id header)")
    p.add_argument("--since", type=float, default=60.0, metavar="SECONDS",
                   help="window of time to list or export (default 60)")
    p.add_argument("--chrome", metavar="OUT.json",
                   help="write the Chrome trace-event JSON (Perfetto, chrome://tracing) here; "
                        "with --request-id, only that request's events")
    p.add_argument("--json", action="store_true", help="print the server's JSON as is")
    args = p.parse_args(argv)

    params = {"request_id": args.request_id} if args.request_id else {"since": args.since}
    if args.chrome:
        raw = fetch(args.url, "/debug/traces", {**params, "format": "chrome"}, args.api_key)
        with open(args.chrome, "wb") as f:
            f.write(raw)
        data = json.loads(raw)
        tracks = sum(1 for e in data["traceEvents"] if e.get("name") == "thread_name")
        print(f"wrote {args.chrome}: {data['otherData']['events']} event(s) on {tracks} "
              "track(s); open it in https://ui.perfetto.dev or chrome://tracing")
        return 0
    raw = fetch(args.url, "/debug/traces", params, args.api_key)
    if args.json:
        sys.stdout.write(raw.decode("utf-8") + "\n")
        return 0
    data = json.loads(raw)
    print(format_timeline(data) if args.request_id else format_events(data))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
