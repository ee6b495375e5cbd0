"""The model repository: scan ``models/``, verify and load each model, list, reload.

A model that fails any check (unreadable manifest, hash mismatch, graph that will not load or
run, a name another folder declares too) is recorded with its error and reported by /readyz and
/v1/models; it never stops the others from serving. A reload loads only the folders whose files
changed since their model was loaded. A reload that finds a served model's folder
broken (a half-finished copy, its manifest missing or unreadable) keeps serving the version it
had, with the error attached, until a valid one loads; only a folder that is gone unloads. A
reload without the models folder at all is refused.
"""

from __future__ import annotations

import asyncio
import contextvars
import gc
import hashlib
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from service.api.errors import ApiError
from service.manifest import CLASS_AXIS, MANIFEST_FILE, MAX_SEGMENT_CLASSES, MODEL_NAME, Manifest, ServingSpec, Task
from service.memory import trim_heap
from service.metrics import Metrics
from service.runtime import SHRINK_ABOVE_PIXELS, MicroBatcher, OnnxModel
from service.settings import Settings
from service.tasks.denoising import RUN_PIXELS

log = logging.getLogger("ocellus")
# A retired model still in use is closed when idle, or after this long at most (its requests then fail with 503
# model_unloaded): a 50 MP photo denoised in tiles on a busy machine takes minutes.
RETIRED_MODEL_BACKSTOP_S = 600.0


@dataclass(frozen=True)
class FolderFiles:
    """A model folder's manifest text and its graph file's identity (device, inode, size, mtime, ctime):
    a copy, a rename into place or a write in place changes one of them (ctime cannot be set back)."""

    manifest_text: str
    graph: tuple[int, ...]

    @classmethod
    def read(cls, manifest_text: str, graph: Path) -> FolderFiles:
        stat = graph.stat()
        return cls(manifest_text, (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns))


@dataclass(frozen=True)
class Serving:
    """A model's micro-batcher and session settings in effect: its manifest's ``serving`` keys, else the server's."""

    max_batch_size: int
    max_batch_wait_ms: float
    max_queue: int
    sessions: int
    threads: int  # intra-op threads per session


@dataclass
class LoadedModel:
    manifest: Manifest
    model: OnnxModel
    batcher: MicroBatcher
    path: Path
    loaded_at: float
    files: FolderFiles  # what was loaded: a reload keeps the model while they are unchanged
    serving: Serving
    reload_error: str | None = None  # the folder failed a later reload; this is the last good version

    @property
    def name(self) -> str:
        return self.manifest.name


@dataclass
class FailedModel:
    name: str
    path: Path
    error: str
    declared: bool = True  # filed under the name its manifest declares (else under its folder's)
    files: FolderListing | None = None  # folder_files() as it failed: a later scan loads it again only once they change


FolderListing = tuple[tuple[object, ...], ...]


def folder_files(model_dir: Path) -> FolderListing | None:
    """Every file of a model folder with its identity (inode, size, mtime, ctime); None when it cannot be listed."""
    try:
        with os.scandir(model_dir) as entries:
            stats = [(entry.name, entry.stat()) for entry in entries]
    except OSError:
        return None
    return tuple(sorted((name, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns) for name, st in stats))


class SameFailure(Exception):
    """A folder that failed before, its files unchanged: it fails the same way (not loaded, hashed or logged again:
    with OCELLUS_MODELS_POLL_S each poll did all three)."""


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _warm_up_input(manifest: Manifest, max_batch_size: int) -> np.ndarray:
    """Two samples where the model's runs may hold two (an output without the batch first then shows), at the graph's
    size or 64 px rounded up to its stride."""
    if manifest.input.size is None:
        side = -(-64 // manifest.stride) * manifest.stride
        height, width = side, side
    else:
        height, width = manifest.input.size
    return np.zeros((min(2, max_batch_size), manifest.input.channels, height, width), np.float32)


def output_shape_problem(task: Task, out: dict[str, np.ndarray], nchw: tuple[int, ...], labels: int) -> str | None:
    """Why a graph's outputs (by role) on an input of shape ``nchw`` cannot be served, or None. A graph that runs but
    whose outputs the task cannot read must fail to load: logits [N, C, 1, 1] answered every request 500, and a
    colour denoiser giving one channel answered every colour photo gray."""
    batch, channels, size = nchw[0], nchw[1], tuple(nchw[2:])

    def classes(count: int) -> str | None:
        if count < 2 and task != Task.detection:  # detection scores each class alone: one class is fine
            return f"{count} class: softmax needs at least 2"
        return f"{count} classes but {labels} labels" if labels and count != labels else None

    if task == Task.classification:
        logits = out["logits"]
        return "logits must be [N, classes]" if logits.ndim != 2 or len(logits) != batch else classes(logits.shape[1])
    if task == Task.segmentation:
        logits = out["logits"]
        if logits.ndim != 4 or len(logits) != batch or tuple(logits.shape[2:]) != size:
            return "logits must be [N, classes, H, W] at the input's size"
        if logits.shape[1] > MAX_SEGMENT_CLASSES:
            return f"{logits.shape[1]} classes: segmentation label maps are 8-bit, at most {MAX_SEGMENT_CLASSES}"
        return classes(logits.shape[1])
    if task == Task.denoising:  # a gray output of a colour graph was spread over R, G and B; 4 channels answered 500s
        return None if out["image"].shape == (batch, channels, *size) else f"image must be [N, {channels}, H, W] like the input"
    if task == Task.face_embedding:  # [N, D, 1, 1] (a conv head without Flatten) is read as [N, D]
        embedding = out["embedding"]
        flat = embedding.ndim >= 2 and len(embedding) == batch and all(side == 1 for side in embedding.shape[2:])
        return None if flat else "embedding must be [N, D] (or [N, D, 1, 1])"
    boxes, scores = out["boxes"], out["scores"]
    if boxes.ndim != 3 or len(boxes) != batch or boxes.shape[2] != 4 or scores.ndim != 3 or boxes.shape[:2] != scores.shape[:2]:
        return "boxes must be [N, A, 4] (x1 y1 x2 y2 in input pixels) and scores [N, A, classes]"
    return classes(scores.shape[2])


def _check_outputs(manifest: Manifest, inputs: np.ndarray, outputs: list[np.ndarray]) -> None:
    out = dict(zip(manifest.outputs, outputs, strict=True))
    problem = output_shape_problem(manifest.task, out, inputs.shape, len(manifest.labels))
    size = manifest.defaults.get("embedding_size")
    if problem is None and manifest.task == Task.face_embedding and size is not None and out["embedding"][0].size != size:
        problem = f"embedding_size is {size}"
    if problem:
        shapes = {role: list(value.shape) for role, value in out.items()}
        raise ValueError(f"outputs {shapes} on a {list(inputs.shape)} input: {problem}")


def _number_labels(manifest: Manifest, outputs: list[np.ndarray]) -> None:
    """A manifest without labels gets the graph's class numbers (as add_model writes them)."""
    if manifest.task in CLASS_AXIS and not manifest.labels:
        role, axis = CLASS_AXIS[manifest.task]
        count = dict(zip(manifest.outputs, outputs, strict=True))[role].shape[axis]
        manifest.labels = [str(index) for index in range(count)]


def retired_folder(model_dir: Path) -> Path:
    """Where a served model folder sits for the instant between the two renames that replace it."""
    return model_dir.with_name(f".{model_dir.name}.previous")


def publish_model_folder(model_dir: Path, fill: Callable[[Path], None]) -> Path:
    """Write a model folder with ``fill(folder)`` beside ``model_dir``, then rename it into place.

    A reload meanwhile sees the previous version or the new one, never a mix: the previous one sits at
    :func:`retired_folder` for the instant between the two renames (reload treats it as still there),
    and a failure while filling leaves it untouched. A linked folder is replaced where the link points.
    """
    if model_dir.is_symlink():
        model_dir = model_dir.resolve()
    model_dir.parent.mkdir(parents=True, exist_ok=True)
    building, retired = model_dir.with_name(f".{model_dir.name}.building"), retired_folder(model_dir)
    shutil.rmtree(building, ignore_errors=True)
    building.mkdir()
    try:
        fill(building)
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)
        raise
    shutil.rmtree(retired, ignore_errors=True)  # left by a swap that was cut short
    if model_dir.exists():
        model_dir.rename(retired)
    building.rename(model_dir)
    shutil.rmtree(retired, ignore_errors=True)
    return model_dir


def manifest_text(model_dir: Path) -> str:
    """``model_dir``'s manifest; a ValueError for one that is not a regular file (reading a FIFO would block the
    reload, and the start, for good)."""
    manifest = model_dir / MANIFEST_FILE
    if not manifest.is_file():
        raise ValueError(f"{MANIFEST_FILE} is not a regular file")
    return manifest.read_text()


def arena_shrink_above(manifest: Manifest, max_batch_size: int) -> int:
    """The samples x pixels past which a run of a free-size graph shrinks the arena after it: a model served at a fixed
    size never runs more than its largest batch of it (/v1), which its arena keeps; one served at any size, or a larger
    /v2 run, hands back what it grew beyond that (or beyond one 512x512 window)."""
    side = manifest.input.size
    return max(SHRINK_ABOVE_PIXELS, 0 if side is None else max_batch_size * side[0] * side[1])


def declared_name(model_dir: Path) -> str | None:
    """The name the manifest declares for requests to use, when it can be read at all and is a model name."""
    try:
        name = json.loads(manifest_text(model_dir)).get("name")
    except Exception:
        return None
    return name if isinstance(name, str) and re.fullmatch(MODEL_NAME, name) else None


def has_manifest_entry(folder: Path) -> bool:
    """Whether ``folder`` holds a model.json entry. A folder the service's user may not search counts (its failure
    is then reported: skipping it made a model vanish without a word), but for the filesystem's lost+found, which
    a volume mounted as the repository often has (root's, mode 700)."""
    try:
        os.lstat(folder / MANIFEST_FILE)
    except (FileNotFoundError, NotADirectoryError):
        return False
    except OSError:
        return folder.name != "lost+found"
    return True


def printable(text: str) -> str:
    """``text`` with what JSON responses cannot carry (a folder name that is not UTF-8) as backslash escapes."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def return_freed_memory() -> None:
    """Hand the memory of retired sessions back to the system. glibc keeps freed heap in its arenas: without
    this a replica's RSS grew ~30 MB with every reload (312 -> 775 MB over 15), though nothing leaked."""
    gc.collect()  # sessions in reference cycles (a batcher's threads) go now, not at some later collection
    trim_heap()


class ModelRepository:
    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.loaded: dict[str, LoadedModel] = {}
        self.failed: dict[str, FailedModel] = {}
        self._reload_lock = asyncio.Lock()
        self._failures: dict[Path, FailedModel] = {}  # by folder, as the last scan found them
        self._default_problems: dict[str, str] = {}  # as last logged
        self._retiring: set[asyncio.Task[None]] = set()  # retired models whose long requests still run

    def load_model(self, model_dir: Path) -> LoadedModel:
        text = manifest_text(model_dir)
        manifest = Manifest.parse(text)
        graph = model_dir / manifest.file
        if not graph.is_file():
            raise ValueError(f"{manifest.file} is missing")
        files = FolderFiles.read(text, graph)  # before hashing: a graph changed meanwhile reloads next time
        # Read once: the sessions are built from the bytes that were hashed. Opened again per session, a graph
        # copied over in between would serve under the manifest (labels, weights version) of the one checked.
        data = graph.read_bytes()
        actual = hashlib.sha256(data).hexdigest()
        if actual != manifest.sha256:
            raise ValueError(f"{manifest.file} has sha256 {actual[:12]}..., the manifest says {manifest.sha256[:12]}...")
        serving = self.serving(manifest)
        shrink_above = arena_shrink_above(manifest, serving.max_batch_size)
        replicas = [
            OnnxModel(data, manifest.input.name, list(manifest.outputs.values()), serving.threads, shrink_above)
            for _ in range(serving.sessions)
        ]
        del data
        warm_up = _warm_up_input(manifest, serving.max_batch_size)  # max_batch_size 1: a graph that runs one at a time
        for replica in replicas:
            outputs = replica.run(warm_up)  # a graph that cannot run must fail here, not on a request
        _check_outputs(manifest, warm_up, outputs)
        _number_labels(manifest, outputs)
        model = replicas[0]
        batcher = MicroBatcher(
            [replica.run for replica in replicas],
            serving.max_batch_size,
            serving.max_batch_wait_ms / 1000,
            serving.max_queue,
            self.metrics.observer(manifest.name),
            max_batch_pixels=RUN_PIXELS if manifest.input.size is None else None,
        )
        return LoadedModel(manifest, model, batcher, model_dir, time.time(), files, serving)

    def serving(self, manifest: Manifest) -> Serving:
        own, server = manifest.serving or ServingSpec(), self.settings
        sessions = own.sessions or server.ort_sessions
        return Serving(
            max_batch_size=own.max_batch_size or server.max_batch_size,
            max_batch_wait_ms=server.max_batch_wait_ms if own.max_batch_wait_ms is None else own.max_batch_wait_ms,
            max_queue=own.max_queue or server.max_queue,
            sessions=sessions,
            threads=server.threads_per_session(sessions),
        )

    @staticmethod
    def unchanged(model: LoadedModel) -> bool:
        """Whether ``model``'s folder still holds exactly the files it was loaded from."""
        try:
            return model.files == FolderFiles.read(manifest_text(model.path), model.path / model.manifest.file)
        except (OSError, ValueError):  # UnicodeDecodeError is a ValueError
            return False

    def scan(
        self, served: dict[Path, LoadedModel] | None = None, polled: bool = False
    ) -> tuple[dict[str, LoadedModel], dict[str, FailedModel]]:
        """Load every model folder; a folder whose files are those a ``served`` model was loaded from keeps
        that model (no new session, no hash, no drain: a reload redoes only what changed). ``polled``: a folder that
        failed before with the same files fails again without being loaded (a reload asked for retries it)."""
        loaded: dict[str, LoadedModel] = {}
        failed: dict[str, FailedModel] = {}
        root = self.settings.models_dir
        if not root.is_dir():
            # (an install that is not editable, started outside the checkout, has no models/ of its own)
            log.error("models_dir %s does not exist: set OCELLUS_MODELS_DIR to the model repository", root.resolve())
            return loaded, failed
        # Any folder with a model.json entry, even one that cannot be read (a directory, a symlink loop): reported.
        # Hidden ones are skipped: publish_model_folder builds a folder as .<name>.building and renames it into place.
        folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".") and has_manifest_entry(p))
        declared = {model_dir: declared_name(model_dir) for model_dir in folders}
        claims: dict[str, list[Path]] = {}
        for model_dir, name in declared.items():
            if name is not None:  # a manifest that names no model (unreadable, a bad name) claims none
                claims.setdefault(name, []).append(model_dir)

        # A served model whose folder now fails keeps serving under its name (reload's _keep): nothing else takes it.
        held = {model.name: path for path, model in (served or {}).items()}

        def folder_key(model_dir: Path) -> str:
            """A failure's name when its manifest's is unusable or shared: the folder's, unless another folder declares
            it or serves under it, or another failure has it."""

            def taken(key: str) -> bool:
                return model_dir not in claims.get(key, [model_dir]) or held.get(key, model_dir) != model_dir or key in failed

            key = printable(model_dir.name)
            while taken(key):
                key = f"{key} (folder)"
            return key

        for model_dir, name in declared.items():
            sharing = sorted(p.name for p in claims[name]) if name is not None and len(claims[name]) > 1 else []
            files: FolderListing | None = None
            try:
                if sharing:  # neither serves: which one the name means is the operator's call
                    raise ValueError(f"name {name!r} is declared by {len(sharing)} folders: {sharing}")
                previous = (served or {}).get(model_dir)
                if previous is not None and self.unchanged(previous):
                    previous.reload_error = None  # the folder is whole again: it holds what is served
                    loaded[previous.name] = previous
                    continue
                files = folder_files(model_dir)  # (not for a served folder unchanged) before the load: a change during it is seen
                earlier = self._failures.get(model_dir)
                if polled and earlier is not None and files is not None and earlier.files == files:
                    raise SameFailure(earlier.error)
                model = self.load_model(model_dir)
                loaded[model.name] = model
            except Exception as error:  # any failure marks this model failed, never the server
                if not isinstance(error, SameFailure):
                    log.error("model %s failed to load: %s", model_dir.name, error)
                # Under the declared name unless it is shared, taken, or a kept model's (one of another folder's).
                free = name is not None and not sharing and name not in loaded and name not in failed
                key = name if name is not None and free and held.get(name, model_dir) == model_dir else folder_key(model_dir)
                failed[key] = FailedModel(key, model_dir, printable(self._without_root(str(error))), key == name, files)
        self._failures = {failure.path: failure for failure in failed.values()}  # kept models' folders too
        return loaded, failed

    def _without_root(self, message: str) -> str:
        """``message`` with the models folder's absolute path cut to its name: clients see the error, not the host's layout."""
        root = self.settings.models_dir
        for prefix in {str(root.resolve()), str(root.absolute()), str(root)}:
            message = message.replace(prefix + os.sep, f"{root.name}{os.sep}")
        return message

    def _publish(self, loaded: dict[str, LoadedModel], failed: dict[str, FailedModel], announce: bool = True) -> None:
        # By name: a task's default is its first model by name (a model kept by a reload was added last).
        self.loaded, self.failed = dict(sorted(loaded.items())), failed
        for name, model in loaded.items():  # the served batcher's queue, from now on
            self.metrics.watch_queue(name, model.batcher.queued_count)
        self.metrics.models.labels("ready").set(len(loaded))
        self.metrics.models.labels("failed").set(len(failed))
        if announce:
            log.info("models ready: %s; failed: %s", sorted(loaded), sorted(failed))
        problems = self.default_problems()
        for task, problem in problems.items():  # every request of that task naming no model fails
            if announce or self._default_problems.get(task) != problem:  # (a poll logs what is new only)
                log.error("OCELLUS_DEFAULT_MODELS: the %s default %s", task, problem)
        self._default_problems = problems

    def default_problems(self) -> dict[str, str]:
        """The configured task defaults that cannot serve their task now, by task (shown by /readyz)."""
        problems = {}
        for task, name in self.settings.task_defaults.items():
            model = self.loaded.get(name)
            if model is None:
                problems[task] = f"{name}: " + ("failed to load" if name in self.failed else "no model of that name")
            elif model.manifest.task.value != task:
                problems[task] = f"{name}: a {model.manifest.task.value} model"
        return problems

    def load_all(self) -> None:
        try:
            found = self.scan()
        except OSError as error:  # a volume the service's user may not list: started not ready, as for a missing folder
            log.error("models_dir %s cannot be read (%s): no model is served", self.settings.models_dir.resolve(), error.strerror)
            found = {}, {}
        self._publish(*found)

    async def reload(self, polled: bool = False) -> dict[str, list[str]]:
        """Re-scan the repository, swap it in, then retire the replaced models' batchers once drained. Returns what
        it did, by model name: ``loaded`` (new, or their files changed), ``unchanged``, ``kept`` (the folder now
        fails; the version before serves on), ``failed`` and ``removed`` (served before, folder gone).

        Only folders whose files changed load afresh (as Triton's repository polling does); the others keep
        their model. Requests that picked a replaced model before the swap (decoding, queued or running)
        finish on it.
        """
        async with self._reload_lock:
            missing = ApiError(
                409,
                "models_dir_missing",
                f"the models folder {self.settings.models_dir.name!r} does not exist; the {len(self.loaded)} loaded model(s) "
                "keep serving",
            )
            if not self.settings.models_dir.is_dir():
                raise missing
            old = self.loaded
            by_path = {model.path: model for model in old.values()}
            try:
                loaded, failed = await asyncio.to_thread(self.scan, by_path, polled)
            except FileNotFoundError:  # the folder went while it was listed
                raise missing from None
            except OSError as error:  # the service's user may no longer list it: nothing is unloaded
                message = f"the models folder cannot be read ({error.strerror}); the {len(old)} loaded model(s) keep serving"
                raise ApiError(409, "models_dir_unreadable", message) from None
            if not self.settings.models_dir.is_dir():  # ... or right after: what the scan saw is not the repository
                raise missing
            for key, failure in list(failed.items()):
                previous = by_path.get(failure.path)
                if previous is not None and previous.name not in loaded:
                    self._keep(previous, failure.error, loaded)
                    # Unless the folder now declares another name: that one stays failed. A folder's failure filed
                    # under the folder's name (its manifest unreadable) is the kept model's, not a second model.
                    if key == previous.name or not failure.declared:
                        del failed[key]
            scanned = {model.path for model in loaded.values()} | {failure.path for failure in failed.values()}
            for previous in old.values():
                if previous.name in loaded:
                    continue
                if previous.path not in scanned and os.path.lexists(previous.path / MANIFEST_FILE):
                    # Swapped in between the scan's listing (which missed the folder) and now: load it now.
                    replacement = await asyncio.to_thread(self._try_load, previous.path)
                    if replacement is not None and replacement.name == previous.name:
                        loaded[previous.name] = replacement
                    else:
                        self._keep(previous, "its folder was replaced during the reload and does not load: reload again", loaded)
                    continue
                swapping = retired_folder(previous.path).is_dir()  # between publish_model_folder's two renames
                if swapping or (previous.path.is_dir() and not os.path.lexists(previous.path / MANIFEST_FILE)):
                    self._keep(previous, "its folder is being replaced" if swapping else f"{MANIFEST_FILE} is missing", loaded)
            self._publish(loaded, failed, announce=not polled)
            kept = {name for name, model in loaded.items() if model.reload_error is not None}
            fresh = {name for name, model in loaded.items() if old.get(name) is not model and name not in kept}
            changes = {
                "loaded": sorted(fresh),
                "unchanged": sorted(set(loaded) - fresh - kept),
                "kept": sorted(kept),
                "failed": sorted(failed),
                "removed": sorted(set(old) - set(loaded) - set(failed)),
            }
            retired = await self._retire([model for model in old.values() if loaded.get(model.name) is not model])
            previous = None  # the loops' variable may hold a retired model too
            del old, by_path  # the last references to the retired models: they go before the memory is handed back
        if retired:  # a reload that kept every model has nothing to give back
            await asyncio.to_thread(return_freed_memory)
        return changes

    async def poll(self, every_s: float) -> None:
        """Run for the server's life (OCELLUS_MODELS_POLL_S): reload every ``every_s`` seconds, logging what changed
        and a refusal (the models folder gone) once while it lasts."""
        shown: object = ([], sorted(self.failed))  # as loaded at start
        while True:
            await asyncio.sleep(every_s)
            try:
                changes = await self.reload(polled=True)  # quiet: what changed is logged below
            except ApiError as error:
                if error.detail != shown:
                    log.error("models poll: %s", error.detail)
                shown = error.detail
                continue
            except Exception:  # an unexpected fault: logged, and polling goes on
                log.exception("models poll failed")
                continue
            if isinstance(shown, str):  # the refusal logged last is over
                log.info("models poll: the models folder can be read again")
            state = (changes["kept"], changes["failed"])
            shown_keys = ("loaded", "removed", "kept", "failed") if state != shown else ("loaded", "removed")
            if news := {key: changes[key] for key in shown_keys if changes[key]}:
                log.info("models poll: %s", news)
            shown = state

    async def _retire(self, models: list[LoadedModel]) -> int:
        """Close the batchers of models no longer served as they were, once their requests are answered. One
        still in use after ``request_timeout_s`` (a large tiled denoise runs for minutes, each run within the
        timeout) is closed in the background when it is idle: closing it now would fail its remaining runs.
        The models drain together: one after another, a reload replacing nine busy ones took nine timeouts."""

        async def retire(model: LoadedModel) -> bool:
            await model.batcher.drain(self.settings.request_timeout_s)
            if model.batcher.idle:
                await self._close_retired(model)
                return True
            task = asyncio.get_running_loop().create_task(self._close_when_idle(model), context=contextvars.Context())
            self._retiring.add(task)
            task.add_done_callback(self._retiring.discard)
            return False

        return sum(await asyncio.gather(*(retire(model) for model in models)))

    async def _close_when_idle(self, model: LoadedModel) -> None:
        try:
            await model.batcher.drain(RETIRED_MODEL_BACKSTOP_S)
        finally:  # idle, past the backstop, or the server is stopping
            await self._close_retired(model)
        del model
        await asyncio.to_thread(return_freed_memory)

    async def _close_retired(self, model: LoadedModel) -> None:
        await model.batcher.close()
        if model.name not in self.loaded:
            self.metrics.forget(model.name)

    def _try_load(self, model_dir: Path) -> LoadedModel | None:
        try:
            return self.load_model(model_dir)
        except Exception as error:
            log.error("model %s failed to load: %s", model_dir.name, error)
            return None

    @staticmethod
    def _keep(previous: LoadedModel, error: str, loaded: dict[str, LoadedModel]) -> None:
        if previous.reload_error != error:  # said once, not at every poll
            log.error("model %s: keeping the version loaded before; the folder now fails: %s", previous.name, error)
        previous.reload_error = error
        loaded[previous.name] = previous

    async def close(self) -> None:
        retiring = list(self._retiring)
        for task in retiring:  # shutting down: the requests of retired models had the shutdown grace too
            task.cancel()
        await asyncio.gather(*retiring, return_exceptions=True)
        for model in self.loaded.values():
            await model.batcher.close()

    def get(self, name: str | None, task: Task, color: str | None = None) -> LoadedModel:
        """The named model (it must serve ``task``), else the task's configured default, else its first by name,
        preferring one whose input ``color`` ("RGB" or "GRAY") is the upload's when that is given."""
        configured = "" if name else " (OCELLUS_DEFAULT_MODELS names it; pass ?model=)"
        name = name or self.settings.task_defaults.get(task.value)
        if name is None:
            candidates = [model for model in self.loaded.values() if model.manifest.task == task]
            if not candidates:
                raise ApiError(503, "no_model", f"no {task.value} model is loaded")
            return next((model for model in candidates if model.manifest.input.color == color), candidates[0])
        if name in self.loaded:
            model = self.loaded[name]
            if model.manifest.task != task:
                message = f"model {name!r} is a {model.manifest.task.value} model, not {task.value}{configured}"
                raise ApiError(400, "wrong_task", message)
            return model
        if name in self.failed:
            raise ApiError(503, "model_unavailable", f"model {name!r} failed to load: {self.failed[name].error}")
        raise ApiError(404, "unknown_model", f"no model named {name!r}{configured}; GET /v1/models lists them")
