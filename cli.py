"""`agile-rag-server` / `python -m agile_rag`: start the server."""
from __future__ import annotations

import argparse
import sys

MALLOC_ARENAS = 2


def limit_malloc_arenas(arenas: int = MALLOC_ARENAS) -> bool:
    """glibc gives each thread that allocates its own heap arena (up to 8 per core), and an
    arena's freed pages mostly stay in RSS; the model threads (executor, tokenizers,
    forwards, loads) each left their peak behind. Two arenas, set before any thread starts
    (torch's included), unless MALLOC_ARENA_MAX is set: measured in the chaos test, RSS after
    the run 1.4-2.5 GB with the default, 1.4 GB with two; the peak 2.0-3.3 GB against 2.5.
    True when applied (glibc only)."""
    import os
    if os.environ.get("MALLOC_ARENA_MAX") or not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(-8, int(arenas)))        # M_ARENA_MAX
    except (OSError, AttributeError):
        return False


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["trace"]:                 # agile-rag-server trace --request-id ...
        from .tracecli import main as trace_main
        return trace_main(argv[1:]) or 0
    parser = argparse.ArgumentParser(
        prog="agile-rag-server",
        description="Serve an LLM, embedders and rerankers from one OpenAI-style base URL, "
                    "lending one GPU to whichever model has the heavy work now.",
        epilog="`agile-rag-server trace --help`: read a running server's actor traces.")
    parser.add_argument("--host", help="address to bind (default from configs: 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port (default from configs: 8000)")
    parser.add_argument("--live-config", metavar="PATH",
                        help="liveconfigs.json to serve (default: ./liveconfigs.json)")
    parser.add_argument("--config", metavar="PATH",
                        help="a Python file that sets cold settings (names as in configs.py)")
    parser.add_argument("--torch-threads", type=int, metavar="N",
                        help="torch's intra-op threads (default from configs: 0 = one less "
                             "than the CPU cores, or OMP_NUM_THREADS when set)")
    parser.add_argument("--workers", type=int, metavar="N",
                        help="threads of the pool that runs model work (SERVICE_NUM_WORKERS, "
                             "default 4)")
    parser.add_argument("--front-processes", metavar="N|auto",
                        help="HTTP front processes beside the server for many small "
                             "embeddings requests (FRONT_PROCESSES, default 0; auto: half "
                             "the cores, at most 8, on a CUDA machine with 8 or more cores)")
    args = parser.parse_args(argv)
    if args.workers is not None and args.workers < 1 or \
            args.torch_threads is not None and args.torch_threads < 0:
        parser.error("--workers must be at least 1 and --torch-threads at least 0")

    import os
    # Before CUDA starts: models move in and out of the GPU under a budget, and the default
    # caching allocator fragments under that pattern (measured: OOM re-admitting a 6 GB LLM
    # under an 8 GiB cap); expandable segments keep the cap and the swaps working.
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    limit_malloc_arenas()

    from .configs import front_processes, load_settings
    try:
        settings = load_settings(args.config, HOST=args.host, PORT=args.port,
                                 LIVECONFIGS_PATH=args.live_config,
                                 TORCH_THREADS=args.torch_threads,
                                 SERVICE_NUM_WORKERS=args.workers,
                                 FRONT_PROCESSES=args.front_processes)
        front_processes(settings.FRONT_PROCESSES, cpus=1)       # a bad value fails here
    except (OSError, ValueError, SyntaxError) as exc:
        print(f"agile-rag-server: bad --config: {exc}", file=sys.stderr)
        return 2

    if not os.path.exists(settings.LIVECONFIGS_PATH):
        print(f"agile-rag-server: live config {settings.LIVECONFIGS_PATH!r} not found",
              file=sys.stderr)
        return 2
    from .runtime.liveconfig import LiveConfigError, parse_text
    try:
        with open(settings.LIVECONFIGS_PATH, encoding="utf-8") as f:
            parse_text(f.read(), settings.LIVECONFIGS_PATH)
    except LiveConfigError as exc:
        print("agile-rag-server: the live config cannot be used:", file=sys.stderr)
        for problem in exc.problems:
            print(f"  - {problem}", file=sys.stderr)
        return 2
    from .server import run
    run(settings)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
