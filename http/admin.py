"""Admin API, behind ``ADMIN_KEY`` (Bearer). Every change is written to liveconfigs.json by the
config actor (the file stays the single source of truth) and applied like a hand edit.

GET    /admin/models                    models with state, GPU arbiter state, config error, and
                                        runtime: actors, threads, weights still alive, RSS, fds
POST   /admin/models                    {kind, name, entry}: add (and put on the standby list)
DELETE /admin/models/{name}             take off the standby list and remove the entry
POST   /admin/models/{name}/device      {device: cpu | cuda | cuda:N | flex}
POST   /admin/reload                    re-read liveconfigs.json now
POST   /admin/upload?name=NAME          body: a tar (or tar.gz) of a model folder; answers its path
"""
from __future__ import annotations

import asyncio
import os
import re
import shutil
import tarfile
import tempfile
import threading

import aiofiles
from aiohttp import web

from agile_rag.actors.messages import Describe, EditConfig, ReloadConfig
from agile_rag.actors.model_base import live_weights
from agile_rag.runtime.errors import InvalidRequest, ServiceError
from agile_rag.runtime.liveconfig import SECTION, STANDBY, parse_device

from .errors import json_response
from .keys import SERVER
from .parsing import Fields, bearer_matches, read_json

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
ALLOWED_SUFFIXES = (".safetensors", ".json", ".txt", ".model", ".tiktoken", ".jinja", ".md",
                    ".gguf", ".vocab", ".merges", ".spm") + PICKLE_SUFFIXES
ALLOWED_NAMES = (".gitattributes", "license", "notice", "readme")
NAME_OK = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-]{0,99}$")


class Forbidden(ServiceError):
    status = 403
    type = "permission_error"
    retryable = False


def _check_key(request: web.Request) -> None:
    key = request.app[SERVER].settings.ADMIN_KEY
    if not key:
        raise Forbidden("The admin API is disabled: set ADMIN_KEY in your configs file.")
    if not bearer_matches(request, [key]):
        raise ServiceError("Incorrect admin key.", status=401, code="invalid_admin_key")


@web.middleware
async def admin_guard(request: web.Request, handler):
    if request.path.startswith("/admin"):
        _check_key(request)
    return await handler(request)


async def _apply(request: web.Request, edit, why: str) -> web.Response:
    server = request.app[SERVER]
    result = await server.config_actor.ask(EditConfig(edit=edit, why=why),
                                           timeout=server.settings.MODIFY_TIMEOUT)
    return _result(result, request)


def _result(events: list[str], request: web.Request) -> web.Response:
    failed = [e[len("FAILED: "):] for e in events if e.startswith("FAILED: ")]
    applied = [e for e in events if not e.startswith("FAILED: ")]
    return json_response({"applied": applied, "failed": failed},
                         status=422 if failed else 200, request=request)


def _find(data: dict, name: str) -> str:
    for kind, section in SECTION.items():
        if name in (data.get(STANDBY[kind]) or []) or name in (data.get(section) or {}):
            return kind
    raise InvalidRequest(f"No model named {name!r} in liveconfigs.json.", status=404,
                         code="model_not_found")


def _rss_bytes() -> tuple[int | None, int | None]:
    """This process's resident memory, and the part of it that maps files (shared libraries,
    memory-mapped weights) rather than the heap (Linux; None elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            fields = f.read().split()
        page = os.sysconf("SC_PAGE_SIZE")
        return int(fields[1]) * page, int(fields[2]) * page
    except (OSError, ValueError, IndexError):
        return None, None


def _open_fds() -> int | None:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return None


async def list_models(request: web.Request) -> web.Response:
    server = request.app[SERVER]
    models = []
    for kind, name, actor in server.registry.all():
        s = actor.describe()
        models.append({"name": name, "kind": kind, "actor": actor.name, "state": s.state,
                       "device": s.device, "config_device": s.config_device,
                       "resident_bytes": s.resident_bytes, "weight_bytes": s.weight_bytes,
                       "queue_length": s.queue_length, "last_error": s.error,
                       "gpu_mode": s.gpu_mode, "gpu": s.gpu, "path": actor.spec.path})
    arbiter = server.system.actors.get("vram-arbiter")
    gpu = None
    if arbiter is not None:
        st = await arbiter.ask(Describe(), timeout=5)
        gpu = {"budget": st.budget, "used": st.used, "holders": st.holders,
               "busy": list(st.busy), "waiting": list(st.waiting),
               "devices": st.devices, "placement": st.placement}
    rss, rss_file = _rss_bytes()
    runtime = {"actors": sorted(server.system.actors), "threads": threading.active_count(),
               "thread_groups": thread_groups(),
               # the loaded models' weights still alive, by actor (a removed model's must go)
               "weights_alive": live_weights(),
               "rss_bytes": rss, "rss_file_bytes": rss_file, "open_fds": _open_fds()}
    return json_response({"models": models, "gpu": gpu, "config_error": server.config_error,
                          "runtime": runtime,
                          "live_config": os.path.abspath(server.settings.LIVECONFIGS_PATH)},
                         request=request)


def thread_groups() -> dict[str, int]:
    """The process's threads by name, less a pool's worker number (``model-work_3`` ->
    ``model-work``): which pool grew, when the thread count does."""
    groups: dict[str, int] = {}
    for t in threading.enumerate():
        name = re.sub(r"(_\d+|-\d+|\(.*\))+$", "", t.name) or t.name
        groups[name] = groups.get(name, 0) + 1
    return dict(sorted(groups.items()))


async def add_model(request: web.Request) -> web.Response:
    f = Fields(await read_json(request))
    kind = f.string("kind", required=True)
    if kind not in SECTION:
        raise InvalidRequest("'kind' must be llm, embedder or reranker.", param="kind")
    name = f.string("name", required=True)
    if not NAME_OK.match(name):
        raise InvalidRequest("'name' may use letters, digits, '.', '_' and '-'.", param="name")
    entry = f.obj("entry")
    if not entry:
        raise InvalidRequest("'entry' must be the model's settings, as in liveconfigs.json.",
                             param="entry")

    def edit(data: dict) -> None:
        data.setdefault(SECTION[kind], {})[name] = entry
        standby = data.setdefault(STANDBY[kind], [])
        if name not in standby:
            standby.append(name)
    return await _apply(request, edit, f"add {kind} {name}")


async def delete_model(request: web.Request) -> web.Response:
    name = request.match_info["name"]

    def edit(data: dict) -> None:
        kind = _find(data, name)
        data[STANDBY[kind]] = [n for n in data.get(STANDBY[kind]) or [] if n != name]
        (data.get(SECTION[kind]) or {}).pop(name, None)
    return await _apply(request, edit, f"delete {name}")


async def set_device(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    device = Fields(await read_json(request)).string("device", required=True)
    if parse_device(device) is None:
        raise InvalidRequest("'device' must be cpu, flex, cuda or cuda:N (a card's index).",
                             param="device")

    def edit(data: dict) -> None:
        kind = _find(data, name)
        entry = (data.get(SECTION[kind]) or {}).get(name)
        if entry is None:
            raise InvalidRequest(f"{name!r} has no entry in {SECTION[kind]}.", status=404)
        entry["device"] = device
    return await _apply(request, edit, f"{name} device -> {device}")


async def reload(request: web.Request) -> web.Response:
    server = request.app[SERVER]
    events = await server.config_actor.ask(ReloadConfig(), timeout=server.settings.MODIFY_TIMEOUT)
    return _result(events, request)


def models_dir(settings) -> str:
    if settings.MODELS_DIR:
        return os.path.abspath(os.path.expanduser(settings.MODELS_DIR))
    return os.path.join(os.path.dirname(os.path.abspath(settings.LIVECONFIGS_PATH)), "models")


async def upload(request: web.Request) -> web.Response:
    settings = request.app[SERVER].settings
    name = request.query.get("name", "")
    if not NAME_OK.match(name):
        raise InvalidRequest("Give the model folder a name: /admin/upload?name=my-model "
                             "(letters, digits, '.', '_', '-').", param="name")
    root = models_dir(settings)
    dest = os.path.join(root, name)
    if os.path.exists(dest):
        raise InvalidRequest(f"{dest} already exists; delete it or choose another name.",
                             status=409, code="exists")
    if request.content_length and request.content_length > settings.MAX_UPLOAD_BYTES:
        raise InvalidRequest(f"The upload is larger than MAX_UPLOAD_BYTES "
                             f"({settings.MAX_UPLOAD_BYTES}).", status=413)
    os.makedirs(root, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".upload-", suffix=".tar", dir=root)
    os.close(fd)
    try:
        size = 0
        async with aiofiles.open(tmp, "wb") as out:
            async for chunk in request.content.iter_chunked(1 << 20):
                size += len(chunk)
                if size > settings.MAX_UPLOAD_BYTES:
                    raise InvalidRequest(f"The upload is larger than MAX_UPLOAD_BYTES "
                                         f"({settings.MAX_UPLOAD_BYTES}).", status=413)
                await out.write(chunk)
        loop = asyncio.get_running_loop()
        files = await loop.run_in_executor(None, extract_model_tar, tmp, dest,
                                           settings.ALLOW_PICKLE_UPLOADS)
    finally:
        os.unlink(tmp)
    return json_response({"name": name, "path": dest, "files": files, "bytes": size},
                         status=201, request=request)


def extract_model_tar(archive: str, dest: str, allow_pickle: bool) -> list[str]:
    """Check every member before writing anything: regular files and folders only, no
    absolute paths or '..', known model file types, pickle weights only when allowed."""
    try:
        tar = tarfile.open(archive, "r:*")
    except tarfile.TarError as exc:
        raise InvalidRequest(f"The upload is not a tar archive: {exc}") from None
    with tar:
        members = tar.getmembers()
        names = []
        for m in members:
            path = os.path.normpath(m.name)
            if os.path.isabs(m.name) or path == ".." or path.startswith(".." + os.sep):
                raise InvalidRequest(f"Refused: {m.name!r} points outside the model folder.")
            if not (m.isfile() or m.isdir()):
                raise InvalidRequest(f"Refused: {m.name!r} is a link or special file.")
            if m.isfile():
                low = path.lower()
                if low.endswith(PICKLE_SUFFIXES) and not allow_pickle:
                    raise InvalidRequest(
                        f"Refused: {m.name!r} is a pickle file, which can run code when loaded. "
                        "Upload safetensors, or set ALLOW_PICKLE_UPLOADS = True.")
                if not low.endswith(ALLOWED_SUFFIXES) and \
                        os.path.basename(low) not in ALLOWED_NAMES:
                    raise InvalidRequest(f"Refused: {m.name!r} is not a model file type this "
                                         "server accepts.")
                names.append(path)
        if not names:
            raise InvalidRequest("The archive holds no files.")
        staging = dest + ".partial"
        shutil.rmtree(staging, ignore_errors=True)
        try:
            tar.extractall(staging, members=members, filter="data")
            # a single top-level folder is unwrapped: tar -C parent -cf x.tar my-model/
            entries = os.listdir(staging)
            inner = os.path.join(staging, entries[0]) if len(entries) == 1 else staging
            if len(entries) == 1 and os.path.isdir(inner):
                os.replace(inner, dest)
                shutil.rmtree(staging)
            else:
                os.replace(staging, dest)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return sorted(names)


def add_routes(app: web.Application) -> None:
    r = app.router
    r.add_get("/admin/models", list_models)
    r.add_post("/admin/models", add_model)
    r.add_delete("/admin/models/{name}", delete_model)
    r.add_post("/admin/models/{name}/device", set_device)
    r.add_post("/admin/reload", reload)
    r.add_post("/admin/upload", upload)
