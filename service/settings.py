"""Every service setting in one place, read from ``OCELLUS_*`` environment variables (or ``.env``)."""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from difflib import get_close_matches
from functools import cached_property
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from dotenv import dotenv_values
from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from service.cpus import available_cpus
from service.gallery import GALLERY_NAME
from service.manifest import Task

# The repository's models/ and data/ when installed from a checkout (pip install -e .), else ./models and
# ./data: started from another folder, the service serves the same models and finds the faces it enrolled.
_CHECKOUT = Path(__file__).resolve().parent.parent
_FROM_CHECKOUT = (_CHECKOUT / "models").is_dir()
DEFAULT_MODELS = _CHECKOUT / "models" if _FROM_CHECKOUT else Path("models")
DEFAULT_DATA = _CHECKOUT / "data" if _FROM_CHECKOUT else Path("data")


def normal_origin(origin: str) -> str:
    """An origin as browsers send it (``https://app.example.com``: lower case, no default port), or ``*``.

    Starlette compares origins as exact strings, so anything else (a path, user info, a wildcard in the
    host, a bad port) would never match: refused at start instead.
    """
    if origin == "*":
        return origin
    parts = urlsplit(origin)
    try:
        port = parts.port
    except ValueError:
        port = -1
    host = parts.hostname or ""  # lower case; an IPv6 address without its brackets
    ipv6 = ":" in host
    if (
        parts.scheme.lower() not in ("http", "https")
        or not re.fullmatch(r"[0-9a-f:.]+" if ipv6 else r"[a-z0-9.-]+", host)
        or parts.username is not None
        or parts.path not in ("", "/")
        or parts.query
        or parts.fragment
        or port == -1
    ):
        raise ValueError(f"OCELLUS_CORS_ORIGINS: {origin!r} is not an origin like https://app.example.com, nor *")
    scheme = parts.scheme.lower()
    default = {"http": 80, "https": 443}[scheme]
    host = f"[{host}]" if ipv6 else host
    return f"{scheme}://{host}" + (f":{port}" if port not in (None, default) else "")


FINGERPRINT_ROUNDS = 20_000  # 5.8 ms a key on this machine: 200 unlabelled keys add 1.2 s to a start


def key_fingerprint(key: str) -> str:
    """What the access log calls a key without a label: 32 bits of a deliberately slow hash (PBKDF2, 20,000 rounds),
    so that a short, hand-made key cannot be found from its log lines by trying words; random keys are safe anyway."""
    return "key-" + hashlib.pbkdf2_hmac("sha256", key.encode(), b"ocellus api key fingerprint", FINGERPRINT_ROUNDS).hex()[:8]


Role = Literal["infer", "read", "write", "admin"]
ROLE_RANK: dict[str, int] = {"infer": 0, "read": 1, "write": 2, "admin": 3}


@dataclass(frozen=True)
class KeyGrant:
    """What one API key may do: its role, the name the access log gives its caller, and the galleries it may
    use (None: every one). A gallery name ending in ``*`` covers every gallery it begins: ``acme.*``."""

    role: str
    label: str
    galleries: tuple[str, ...] | None = None

    def may_use(self, gallery: str) -> bool:
        return self.galleries is None or any(
            gallery.startswith(name[:-1]) if name.endswith("*") else gallery == name for name in self.galleries
        )


def key_galleries(label: str, role: str, field: str) -> tuple[str, ...] | None:
    """The galleries field of an ``OCELLUS_API_KEYS`` entry: names (or ``prefix*``) joined by ``+``; empty = all.
    Errors name the key by its label (or fingerprint), never by the key itself."""
    if not field:
        return None
    names = tuple(sorted({name.strip() for name in field.split("+")}))  # as a set: the label check compares them
    bad = [name for name in names if not re.fullmatch(f"{GALLERY_NAME}\\*?", name)]
    if bad:
        raise ValueError(f"OCELLUS_API_KEYS: key {label!r}: {bad[0]!r} is not a gallery name (nor a name ending in *)")
    if role == "infer":  # an infer key reaches no gallery route: a scope on one is a misunderstanding
        raise ValueError(f"OCELLUS_API_KEYS: key {label!r} names galleries, but the infer role reaches none")
    return names


def is_utf8(path: Path) -> bool:
    """Whether ``path`` is missing (nothing to read) or UTF-8 text."""
    try:
        path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        return True
    except UnicodeDecodeError:
        return False
    return True


TASKS = {task.value for task in Task}
# OCELLUS_ names other programs read: the enroll tool's key, training's tracebacks, docker-compose's env file.
NOT_SERVER_SETTINGS = {"OCELLUS_API_KEY", "OCELLUS_TRACEBACK", "OCELLUS_ENV_FILE"}
# What Kubernetes puts in every pod for a Service named ocellus-<something> (service links): not settings.
KUBERNETES_LINK = re.compile(r"_(SERVICE_HOST|SERVICE_PORT(_\w+)?|PORT(_\d+_(TCP|UDP|SCTP)(_PROTO|_PORT|_ADDR)?)?)$")


class Settings(BaseSettings):
    # hide_input_in_errors: a start-up error must not print the settings it was given (API keys, database passwords).
    # env_file_encoding: UTF-8 whatever the locale (a C locale read it as ASCII), as the error below says.
    model_config = SettingsConfigDict(
        env_prefix="OCELLUS_", env_file=".env", env_file_encoding="utf-8", extra="ignore", hide_input_in_errors=True
    )

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except UnicodeDecodeError as error:  # pydantic-settings' message named a byte, not the file
            given = values.get("_env_file", self.model_config["env_file"])
            files = [given] if isinstance(given, (str, Path)) else list(given or ())
            name = next((str(Path(f).resolve()) for f in files if not is_utf8(Path(f))), "the env file")
            raise ValueError(f"{name} is not UTF-8 text ({error.reason} at byte {error.start})") from None

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    models_dir: Path = Field(DEFAULT_MODELS, description="the model repository: <name>/model.json + model.onnx")
    models_poll_s: float = Field(
        0.0,
        ge=0,
        le=86_400,  # (0, or at least 0.1: see the validator)
        allow_inf_nan=False,
        description="re-scan the model repository this often, as POST /v1/models/reload does (0: only on that call or "
        "SIGHUP): every replica of a deployment then picks up a changed models folder by itself",
    )
    data_dir: Path = Field(DEFAULT_DATA, description="where the embedded SQLite gallery lives")

    # Limits on what a request may carry.
    max_upload_bytes: int = Field(25 * 1024 * 1024, ge=1)
    max_requests: int = Field(
        128, ge=1, description="requests in progress at once (their bodies in memory); more get 503 before being read"
    )
    max_image_pixels: int = Field(50_000_000, ge=1)
    max_pixels_in_flight: int = Field(
        150_000_000,
        ge=1,
        description="pixels of uploaded photos worked on at once (each request's, from decoding until its answer is "
        "sent); more wait, at most request_timeout_s, then answer 503",
    )
    body_timeout_s: float = Field(
        120.0,
        gt=0,
        description="the whole request body must arrive within this many seconds of the request (25 MB at 1.7 Mbit/s); "
        "a client that trickles its upload would otherwise hold one of max_requests for good",
    )
    request_timeout_s: float = Field(30.0, gt=0, description="longest wait for one model run (queue + session.run)")
    shutdown_grace_s: float = Field(
        35.0, ge=0, description="on SIGTERM, how long requests in flight may finish (keep it above request_timeout_s)"
    )

    # ONNX Runtime and the micro-batcher.
    ort_sessions: int = Field(1, ge=1, description="ONNX Runtime session replicas per model, each with its own worker thread")
    ort_threads: int = Field(
        0,
        ge=0,
        description="intra-op threads per session; 0 = the usable CPUs (affinity, container quota) shared among the replicas",
    )
    max_batch_size: int = Field(32, ge=1)
    max_batch_wait_ms: float = Field(5.0, ge=0, description="longest wait for requests being decoded to join a batch")
    max_queue: int = Field(512, ge=1, description="requests waiting per model before answering 503")

    # Faces and galleries.
    gallery_url: str = Field(
        "",
        pattern=r"^((sqlite|postgresql)(\+\w+)?:.*)?$",
        description="SQLAlchemy URL of the gallery store, sqlite: or postgresql: (their write locks keep the change log in "
        "commit order); empty = SQLite under data_dir",
    )
    gallery_sync_interval_s: float = Field(
        0.25, ge=0.01, le=60, description="how often a replica applies other replicas' gallery changes"
    )
    gallery_min_face_px: int = Field(
        20,
        ge=0,
        description="enrollment refuses a detected face whose shorter side is below this (pixels of the photo): "
        "too few pixels for a face print, and where the detector's stray finds are",
    )
    gallery_keep_photos: bool = Field(
        True, description="keep the face region of each enrollment (JPEG) so a new face model can re-embed the gallery"
    )
    gallery_change_log_keep: int = Field(
        100_000, ge=1, description="change-log rows kept for replicas catching up; one further behind reloads a snapshot"
    )
    gallery_ann_min_faces: int = Field(
        100_000, ge=0, description="faces per gallery and model from which an IVF index serves searches; 0 = always exact"
    )
    gallery_timeout_s: float = Field(
        10.0,
        # Bounded: PostgreSQL's statement_timeout (6x this, in ms) must fit an int32, and under 1 ms its lock_timeout
        # rounded to 0, which means none; inf failed the start.
        ge=0.001,
        le=3600,
        description="longest wait for one gallery store operation; a store that takes longer answers 503",
    )
    gallery_max_connections: int = Field(
        16,
        ge=2,
        le=1000,
        description="database connections (and store threads) one replica may hold; replicas x this must stay "
        "under PostgreSQL's max_connections (100 by default)",
    )

    # "detection=facemask-detector,face_embedding=lfw-face": the model a request without ?model= gets,
    # per task; a task not named here gets its first loaded model by name.
    default_models: str = ""
    # "key1:admin,key2:write:ops-team,key3:read,key4:infer,key5:write:kiosk:staff+visitors": key, role (read when
    # left out) and, optionally, a label for the access log (else the key's fingerprint) and the galleries the key
    # may use (names joined by +, "acme.*" for every name beginning "acme."; else all); empty = no authentication.
    api_keys: str = ""
    # Web pages on these origins may call the API from a browser (CORS): "https://app.example.com,http://localhost:3000"
    # or "*"; empty = none (browsers then refuse other sites' scripts).
    cors_origins: str = ""
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"
    # Answers carry a Server-Timing header: milliseconds spent on images, in the batch queue, in the model, in the
    # gallery store and search (service/timing.py); off, when a client must not learn how the time was spent.
    server_timing: bool = True

    @field_validator("models_poll_s")
    @classmethod
    def _poll_off_or_a_pause(cls, value: float) -> float:
        if 0 < value < 0.1:  # a scan after another, without a pause
            raise ValueError("0 (no polling) or at least 0.1 seconds")
        return value

    @field_validator("gallery_url")
    @classmethod
    def _usable_gallery_url(cls, value: str) -> str:
        """Parsed, and its driver found, now: a typo or a missing driver failed the start with a traceback, after every
        model had loaded, without naming the setting. The value is never quoted (it may hold a password)."""
        if value:
            from sqlalchemy.engine import make_url  # only where a URL is set: the import takes ~0.1 s

            try:
                make_url(value).get_dialect().import_dbapi()
            except ImportError as error:
                raise ValueError(f"its database driver is not installed (no module {error.name!r})") from None
            except Exception as error:  # ArgumentError, a port that is not a number (ValueError), an unknown driver
                example = "postgresql+psycopg://user@host/db"
                raise ValueError(f"not a SQLAlchemy URL ({type(error).__name__}), e.g. {example}") from None
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower_case_level(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value

    def model_post_init(self, context: object) -> None:
        # Parse the list settings now: a typo must stop the server at start, not fail every request.
        _ = self.api_key_entries, self.task_defaults, self.cors_origin_list

    @cached_property  # read from /proc and the cgroup files once, not at every session created
    def intra_op_threads(self) -> int:
        return self.threads_per_session(self.ort_sessions)

    def threads_per_session(self, sessions: int) -> int:
        """OCELLUS_ORT_THREADS, else the usable CPUs shared among ``sessions`` replicas."""
        return self.ort_threads or max(1, self.usable_cpus // sessions)

    @cached_property
    def usable_cpus(self) -> int:
        return available_cpus()

    @cached_property
    def task_defaults(self) -> dict[str, str]:
        defaults: dict[str, str] = {}
        for entry in filter(None, (part.strip() for part in self.default_models.split(","))):
            task, _, name = entry.partition("=")
            if task.strip() not in TASKS or not name.strip():
                raise ValueError(f"OCELLUS_DEFAULT_MODELS: {entry!r} is not task=model with a task of {sorted(TASKS)}")
            defaults[task.strip()] = name.strip()
        return defaults

    @cached_property
    def cors_origin_list(self) -> list[str]:
        origins = [normal_origin(part.strip()) for part in self.cors_origins.split(",") if part.strip()]
        if "*" in origins and not self.api_key_entries:
            # Any web page a user of this host visits could then read (and enroll into) the galleries.
            raise ValueError("OCELLUS_CORS_ORIGINS=* needs OCELLUS_API_KEYS; or name the origins allowed")
        return origins

    @cached_property
    def api_key_entries(self) -> dict[str, KeyGrant]:
        """Each key's grant: its role, what the access log names its caller by (the label, else a fingerprint,
        never the key) and the galleries it may use."""
        entries: dict[str, KeyGrant] = {}
        for entry in filter(None, (part.strip() for part in self.api_keys.split(","))):
            key, role, label, galleries = [*entry.split(":", 3), "", "", ""][:4]
            key, role, label = key.strip(), role.strip() or "read", label.strip()
            if not key:
                raise ValueError("OCELLUS_API_KEYS: an entry has no key before its role (entries are key:role:label:galleries)")
            label = label or key_fingerprint(key)
            if role not in ROLE_RANK:  # not quoted: a role written before its key would put the key in the logs
                raise ValueError(f"OCELLUS_API_KEYS: key {label!r} has an unknown role (infer, read, write or admin)")
            if label in ROLE_RANK:  # "k:admin:write" read as an admin key labelled "write": a second role, not a label
                raise ValueError(f"OCELLUS_API_KEYS: key {key_fingerprint(key)!r} has two roles ({role} and {label})")
            grant = KeyGrant(role, label, key_galleries(label, role, galleries.strip()))
            if key in entries and entries[key] != grant:  # which one was meant is the operator's call, not the last one's
                raise ValueError(f"OCELLUS_API_KEYS: one key is given two grants ({entries[key]} and {grant})")
            entries[key] = grant
        grants_of_label: dict[str, set[tuple[str, tuple[str, ...] | None]]] = {}
        for grant in entries.values():
            grants_of_label.setdefault(grant.label, set()).add((grant.role, grant.galleries))
        shared = sorted(label for label, grants in grants_of_label.items() if len(grants) > 1)
        if shared:  # the access log could not tell an admin's requests from a reader's
            raise ValueError(f"OCELLUS_API_KEYS: the label {shared[0]!r} names keys of different roles or galleries")
        if self.api_keys.strip() and not entries:
            # "," or an unexpanded "${A},${B}" would otherwise turn authentication off without a word.
            raise ValueError(f"OCELLUS_API_KEYS={self.api_keys!r} holds no key; leave it empty for an open server")
        return entries


def settings_problems(error: ValidationError) -> str:
    """Each wrong setting in one line, by its variable's name ("OCELLUS_PORT: Input should be a valid integer"),
    without pydantic's echo of the values (API keys among them)."""
    problems = [(".".join(map(str, item["loc"])).upper(), item["msg"].removeprefix("Value error, ")) for item in error.errors()]
    return "; ".join(f"OCELLUS_{name}: {message}" if name else message for name, message in problems)


def check_environment(settings: Settings, env_file: Path = Path(".env")) -> list[str]:
    """Warnings, at server start, for OCELLUS_ names in the environment or ``env_file`` that name no setting
    (pydantic-settings skips them without a word: OCELLUS_CORS_ORIGIN did nothing). Raises ValueError for a name
    that looks meant as the server's API keys while none are set: the server would start open."""
    values = {**(dotenv_values(env_file) if env_file.is_file() else {}), **os.environ}
    known = {f"OCELLUS_{field.upper()}" for field in Settings.model_fields}
    others = sorted(  # set (an empty variable sets nothing), not a setting, not a Kubernetes service link
        name
        for name, value in values.items()
        if value and name.upper().startswith("OCELLUS_") and name.upper() not in known and not KUBERNETES_LINK.search(name)
    )
    # OCELLUS_API_KEY (the enroll tool's key), OCELLUS_API_TOKENS, OCELLUS_API_KEYS_FILE, OCELLUS_AUTH_KEYS...
    if not settings.api_key_entries and (meant := [n for n in others if re.search(r"^OCELLUS_API|KEY|TOKEN|SECRET", n.upper())]):
        raise ValueError(f"{meant[0]} is set but OCELLUS_API_KEYS, the server's keys, is not: it would start open")
    warnings = []
    for name in others:
        if name.upper() not in NOT_SERVER_SETTINGS:
            close = get_close_matches(name.upper(), known, 1)
            warnings.append(f"{name} is no setting" + (f" (did you mean {close[0]}?)" if close else "") + "; it is ignored")
    return warnings
