"""Cold settings: read once at start (restart to change them). Hot settings live in
liveconfigs.json.

Names follow the seed's configs.py where they mean the same thing. To change them, pass
``--config my_configs.py`` (a Python file that assigns any of these UPPERCASE names) or the
matching command-line flag (``--host``, ``--port``, ``--live-config``).
"""
from __future__ import annotations

import dataclasses
import os
import runpy

# --- network -------------------------------------------------------------------------------------
HOST = "127.0.0.1"            # loopback only by default; "0.0.0.0" opens the server to the LAN
PORT = 8000
API_KEYS: list[str] = []      # Bearer keys for the model routes; empty = any key (or none) accepted
ADMIN_KEY = ""                # key for /admin routes (Bearer); empty = admin routes disabled
MAX_BODY_BYTES = 16 * 1024 * 1024   # larger request bodies get 413
FRONT_PROCESSES: int | str = 0  # HTTP front processes beside the server (Linux): they share
                              # its port and write the small /v1/embeddings requests' HTTP on
                              # their own cores; other requests (chat streams too) pass through
                              # them (README, "HTTP front processes"); 0 = none; "auto" = half
                              # the CPU cores, at most 8, with a CUDA GPU and 8+ cores, else none

# --- admin uploads -------------------------------------------------------------------------------
MODELS_DIR = ""               # where uploaded model folders go; "" = models/ by liveconfigs.json
MAX_UPLOAD_BYTES = 32 * 2**30 # larger uploads are refused
ALLOW_PICKLE_UPLOADS = False  # .bin/.pt/.pth/.pkl/.ckpt weights can run code when loaded: refused

# --- which services run (the seed's switches) --------------------------------------------------
USE_LLM = True
USE_EMBEDDER = True
USE_RERANKER = True

# --- model work ----------------------------------------------------------------------------------
SERVICE_NUM_WORKERS = 4       # threads in the executor pool that runs model work
TORCH_THREADS = 0             # torch's intra-op threads; 0 = OMP_NUM_THREADS if set, else one
                              # less than the cores (README, "Threads": why, and how to choose)
CUDNN_ATTENTION = False       # let torch's attention use cuDNN's kernels: off, because cuDNN
                              # plans each new shape on the CPU (tens of ms per prompt length
                              # on an H200); flash / memory-efficient attention need no plan
IDLE_TRIM_S = 1.0             # the model pool idle this long: free heap pages go back to the OS
                              # (0 = never; RSS then stays at the busiest moment's mark)
SWITCH_INTERVAL_S = 0.0       # sys.setswitchinterval: how long a thread keeps the GIL while
                              # another waits; 0 = Python's own (0.005)
REQUEST_TIMEOUT = 600.0       # seconds a request may wait for its model (queue + compute)
SHUTDOWN_TIMEOUT = 30.0       # on SIGTERM/Ctrl-C: seconds in-flight requests get to finish
MAX_QUEUED_PER_MODEL = 1024   # requests waiting for one model beyond this get 503 + Retry-After
MODEL_CACHE_DIR = os.path.join(os.path.expanduser("~"), ".cache", "agile_rag")  # dequantised GGUF

# --- GPU residency (the VRAM arbiter) ------------------------------------------------------------
TOTAL_CUDA_MEMORY: int | list[int] = 0   # MB the server may use on each card; 0 = the card's
                              # free memory. Several GPUs: one number for every card, or a list,
                              # one entry per card (cuda:0, cuda:1, ...; 0 = that card's free
                              # memory; cards past the list's end are left alone)
MEMORY_REDUNDANCY = 0.15      # fraction of the budget kept free for activations and fragmentation

# --- live configuration --------------------------------------------------------------------------
LIVECONFIGS_PATH = "liveconfigs.json"
DEBOUNCE_TIME = 0.5           # seconds of quiet after a save before the file is re-read
MODIFY_TIMEOUT = 120.0        # seconds a reload may take before it is abandoned

# --- tracing -------------------------------------------------------------------------------------
TRACE_ENABLED = True
TRACE_BUFFER = 20000          # events kept in memory
TRACE_FILE = ""               # JSONL file to append events to ("" = memory only)
TRACE_FILE_MAX_BYTES = 64 * 1024 * 1024   # rotate the JSONL file past this size (0 = never)
TRACE_FILE_BACKUPS = 5        # rotated files kept: TRACE_FILE.1 ... TRACE_FILE.5

LOG_LEVEL = "INFO"


@dataclasses.dataclass
class Settings:
    HOST: str = HOST
    PORT: int = PORT
    API_KEYS: list = dataclasses.field(default_factory=lambda: list(API_KEYS))
    ADMIN_KEY: str = ADMIN_KEY
    MAX_BODY_BYTES: int = MAX_BODY_BYTES
    FRONT_PROCESSES: int | str = FRONT_PROCESSES
    MODELS_DIR: str = MODELS_DIR
    MAX_UPLOAD_BYTES: int = MAX_UPLOAD_BYTES
    ALLOW_PICKLE_UPLOADS: bool = ALLOW_PICKLE_UPLOADS
    USE_LLM: bool = USE_LLM
    USE_EMBEDDER: bool = USE_EMBEDDER
    USE_RERANKER: bool = USE_RERANKER
    SERVICE_NUM_WORKERS: int = SERVICE_NUM_WORKERS
    TORCH_THREADS: int = TORCH_THREADS
    CUDNN_ATTENTION: bool = CUDNN_ATTENTION
    IDLE_TRIM_S: float = IDLE_TRIM_S
    SWITCH_INTERVAL_S: float = SWITCH_INTERVAL_S
    REQUEST_TIMEOUT: float = REQUEST_TIMEOUT
    SHUTDOWN_TIMEOUT: float = SHUTDOWN_TIMEOUT
    MAX_QUEUED_PER_MODEL: int = MAX_QUEUED_PER_MODEL
    MODEL_CACHE_DIR: str = MODEL_CACHE_DIR
    TOTAL_CUDA_MEMORY: int | list[int] = TOTAL_CUDA_MEMORY
    MEMORY_REDUNDANCY: float = MEMORY_REDUNDANCY
    LIVECONFIGS_PATH: str = LIVECONFIGS_PATH
    DEBOUNCE_TIME: float = DEBOUNCE_TIME
    MODIFY_TIMEOUT: float = MODIFY_TIMEOUT
    TRACE_ENABLED: bool = TRACE_ENABLED
    TRACE_BUFFER: int = TRACE_BUFFER
    TRACE_FILE: str = TRACE_FILE
    TRACE_FILE_MAX_BYTES: int = TRACE_FILE_MAX_BYTES
    TRACE_FILE_BACKUPS: int = TRACE_FILE_BACKUPS
    LOG_LEVEL: str = LOG_LEVEL


def load_settings(path: str | None = None, **overrides) -> Settings:
    """Defaults, then the UPPERCASE names a user's configs file assigns, then ``overrides``."""
    settings = Settings()
    if path:
        names = runpy.run_path(path)
        for key, value in names.items():
            if key.isupper():
                if not hasattr(settings, key):
                    raise ValueError(f"{path}: unknown setting {key}")
                setattr(settings, key, value)
    for key, value in overrides.items():
        if value is not None:
            setattr(settings, key, value)
    return settings


def front_processes(setting: int | str, cpus: int | None = None,
                    cuda: bool | None = None) -> int:
    """How many HTTP front processes ``FRONT_PROCESSES`` asks for on this machine."""
    if setting != "auto":
        try:
            n = int(setting)
        except (TypeError, ValueError):
            n = -1
        if n < 0 or isinstance(setting, (bool, float)):
            raise ValueError(f"FRONT_PROCESSES must be 0 or more, or 'auto'; got {setting!r}")
        return n
    cpus = os.cpu_count() or 1 if cpus is None else cpus
    if cpus < 8:
        return 0
    if cuda is None:
        try:
            import torch
            cuda = bool(torch.cuda.is_available())
        except ImportError:
            cuda = False
    return min(8, cpus // 2) if cuda else 0
