"""Every setting of the service, read from the environment once and validated.

``Settings.from_env(environ)`` returns a frozen dataclass or raises ``SettingsError``
whose message names the variable and what is wrong with it; the service refuses to start
on it. An empty variable counts as unset. Secrets (the Label Studio API key, the basic
auth password, a password inside REDIS_URL) never appear in ``repr`` or in ``public()``.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import os
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

__all__ = [
    "ACQUIRERS",
    "ACQUISITIONS",
    "DEVICES",
    "METHODS",
    "Settings",
    "SettingsError",
]

METHODS = ("s4al", "tsf-plar", "mean-teacher", "supervised")
ACQUISITIONS = ("entropy", "margin", "least-confidence", "random")
ACQUIRERS = ("student", "teacher")
AMP_MODES = ("auto", "off", "bf16", "fp16")  # model.precision.AMP_CHOICES
_BOOLEANS = {"true": True, "1": True, "yes": True, "on": True,
             "false": False, "0": False, "no": False, "off": False}
# the job's time besides training: reading, images, predicting and scoring the pool, pushes
JOB_MARGIN_S = 3600
DEVICES = ("auto", "cpu", "cuda")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

_HEX40 = re.compile(r"[0-9a-fA-F]{40}")
_TOKEN_CHARS = re.compile(r"[A-Za-z0-9_\-]+")
_JWT = re.compile(r"[A-Za-z0-9_\-]+\.[A-Za-z0-9_\-]+\.[A-Za-z0-9_\-]*")
_HOST = re.compile(r"[A-Za-z0-9.\-]+(:\d{1,5})?|\[[0-9A-Fa-f:.]+\](:\d{1,5})?")
_QUEUE = re.compile(r"[A-Za-z0-9_.\-]+")
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?)(I?B?)\s*", re.IGNORECASE)
_MIB = 1024 * 1024


class SettingsError(ValueError):
    """A setting is malformed; the message names the environment variable."""


@dataclass(frozen=True)
class Settings:
    # Label Studio
    label_studio_url: str = "http://localhost:8080"
    label_studio_api_key: str = field(default="", repr=False)
    allowed_image_hosts: tuple[str, ...] = ()
    label_studio_public_url: str = ""  # "": LABEL_STUDIO_URL (the dashboard's task links)
    # the model and prediction
    model_dir: Path = Path("model_dir")
    device: str = "auto"
    predict_batch_size: int = 4
    predict_concurrency: int = 4
    max_image_bytes: int = 30 * _MIB
    max_image_pixels: int = 40_000_000
    max_predict_pixels: int = 2_500_000
    image_timeout: int = 30
    image_cache_dir: Path | None = None  # None: MODEL_DIR/image_cache
    image_cache_mb: int = 1024
    backbone_weights: str = "auto"
    torch_threads: int = 0
    amp: str = "auto"
    # the web service
    basic_auth_user: str = ""
    basic_auth_pass: str = field(default="", repr=False)
    log_level: str = "INFO"
    dashboard_refresh: int = 5
    # training (the jobs and the active-learning cycle)
    redis_url: str = field(default="", repr=False)
    queue_name: str = "s4al"
    train_after_annotations: int = 5
    method: str = "s4al"
    train_iterations: int = 2000
    cold_start_iterations: int = 200
    train_crop: int = 256
    train_batch_size: int = 4
    holdout_fraction: float = 0.1
    acquisition: str = "entropy"
    acquire_with: str = "student"
    region_size: int = 0
    regions_per_image: int = 4
    regions_per_cycle: int = 20
    keep_versions: int = 5
    prediction_versions: int = 2
    score_chunk: int = 200
    chunk_helpers: int = 16
    cycle_budget: int = 2400
    cold_start_budget: int = 300
    first_version: bool = True
    job_timeout: int = 7200
    num_gpus: int = 1

    def __post_init__(self):
        if self.image_cache_dir is None:
            object.__setattr__(self, "image_cache_dir", Path(self.model_dir) / "image_cache")

    # ------------------------------------------------------------------ reading
    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if environ is None else environ
        read = _Reader(env)
        model_dir = read.path("MODEL_DIR", Path("model_dir"))
        values: dict[str, Any] = {
            "label_studio_url": read.url("LABEL_STUDIO_URL", "http://localhost:8080"),
            "label_studio_api_key": read.api_key("LABEL_STUDIO_API_KEY"),
            "allowed_image_hosts": read.hosts("ALLOWED_IMAGE_HOSTS"),
            "label_studio_public_url": read.url("LABEL_STUDIO_PUBLIC_URL", ""),
            "model_dir": model_dir,
            "device": read.device("DEVICE"),
            "predict_batch_size": read.integer("PREDICT_BATCH_SIZE", 4, minimum=1),
            "predict_concurrency": read.integer("PREDICT_CONCURRENCY", 4, minimum=1),
            "max_image_bytes": read.size("MAX_IMAGE_BYTES", 30 * _MIB),
            "max_image_pixels": read.count("MAX_IMAGE_PIXELS", 40_000_000),
            "max_predict_pixels": read.count("MAX_PREDICT_PIXELS", 2_500_000),
            "image_timeout": read.integer("IMAGE_TIMEOUT", 30, minimum=1),
            "image_cache_dir": read.path("IMAGE_CACHE_DIR", model_dir / "image_cache"),
            "image_cache_mb": read.integer("IMAGE_CACHE_MB", 1024, minimum=0),
            "backbone_weights": read.backbone("BACKBONE_WEIGHTS"),
            "torch_threads": read.integer("TORCH_THREADS", 0, minimum=0),
            "amp": read.choice("AMP", "auto", AMP_MODES),
            "basic_auth_user": read.text("BASIC_AUTH_USER", ""),
            "basic_auth_pass": read.text("BASIC_AUTH_PASS", ""),
            "log_level": read.choice("LOG_LEVEL", "INFO", LOG_LEVELS, upper=True),
            "dashboard_refresh": read.integer("DASHBOARD_REFRESH", 5, minimum=1),
            "redis_url": read.redis_url("REDIS_URL"),
            "queue_name": read.pattern("QUEUE_NAME", "s4al", _QUEUE, "letters, digits, _ . -"),
            "train_after_annotations": read.integer("TRAIN_AFTER_ANNOTATIONS", 5, minimum=0),
            "method": read.choice("METHOD", "s4al", METHODS),
            "train_iterations": read.integer("TRAIN_ITERATIONS", 2000, minimum=1),
            "cold_start_iterations": read.integer("COLD_START_ITERATIONS", 200, minimum=0),
            "train_crop": read.integer("TRAIN_CROP", 256, minimum=32),
            "train_batch_size": read.integer("TRAIN_BATCH_SIZE", 4, minimum=1),
            "holdout_fraction": read.fraction("HOLDOUT_FRACTION", 0.1),
            "acquisition": read.choice("ACQUISITION", "entropy", ACQUISITIONS),
            "acquire_with": read.choice("ACQUIRE_WITH", "student", ACQUIRERS),
            "region_size": read.integer("REGION_SIZE", 0, minimum=0),
            "regions_per_image": read.integer("REGIONS_PER_IMAGE", 4, minimum=1),
            "regions_per_cycle": read.integer("REGIONS_PER_CYCLE", 20, minimum=0),
            "keep_versions": read.integer("KEEP_VERSIONS", 5, minimum=1),
            "prediction_versions": read.integer("PREDICTION_VERSIONS", 2, minimum=0),
            "score_chunk": read.integer("SCORE_CHUNK", 200, minimum=1),
            "chunk_helpers": read.integer("CHUNK_HELPERS", 16, minimum=0),
            "cycle_budget": read.integer("CYCLE_BUDGET", 2400, minimum=0),
            "cold_start_budget": read.integer("COLD_START_BUDGET", 300, minimum=0),
            "first_version": read.boolean("FIRST_VERSION", True),
            "num_gpus": read.integer("NUM_GPUS", 1, minimum=1),
        }
        if ":" in values["basic_auth_user"] or not values["basic_auth_user"].isprintable():
            raise SettingsError(
                "BASIC_AUTH_USER: must not contain ':' or control characters (HTTP basic "
                "auth sends user:password, so no client could ever log in)"
            )
        # unset: the job outlives the training budget, so no default cycle is ever killed
        values["job_timeout"] = read.integer(
            "JOB_TIMEOUT", default_job_timeout(values["cycle_budget"]), minimum=1)
        if bool(values["basic_auth_user"]) != bool(values["basic_auth_pass"]):
            missing = "BASIC_AUTH_PASS" if values["basic_auth_user"] else "BASIC_AUTH_USER"
            raise SettingsError(
                f"{missing}: basic auth needs both BASIC_AUTH_USER and BASIC_AUTH_PASS"
            )
        return cls(**values)

    # ------------------------------------------------------------------ derived
    @property
    def basic_auth(self) -> tuple[str, str] | None:
        if self.basic_auth_user and self.basic_auth_pass:
            return self.basic_auth_user, self.basic_auth_pass
        return None

    @property
    def api_key_kind(self) -> str:
        """'legacy' (sent as ``Token``), 'pat' (a JWT refresh token, exchanged for a
        ``Bearer`` access token) or 'none'."""
        if not self.label_studio_api_key:
            return "none"
        return "pat" if _JWT.fullmatch(self.label_studio_api_key) else "legacy"

    @property
    def label_studio_host(self) -> str:
        """host[:port] of LABEL_STUDIO_URL, lower case (the port only if given)."""
        return urlsplit(self.label_studio_url).netloc.lower().rsplit("@", 1)[-1]

    @property
    def image_cache_bytes(self) -> int:
        return self.image_cache_mb * _MIB

    def resolve_device(self) -> str:
        """'cuda' when DEVICE=auto finds a GPU, else 'cpu'; DEVICE=cuda[:n] as given."""
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    def region_size_for(self, image_height: int) -> int:
        """Square acquisition region side in pixels: REGION_SIZE, or when 0, 30 px per
        360 px of image height as in the S4AL paper (at least 1)."""
        if self.region_size:
            return self.region_size
        from model.acquisition import region_size_for  # torch: only when acquiring

        return region_size_for(image_height)

    def public(self) -> dict[str, Any]:
        """Every setting as JSON-ready values, secrets replaced by whether they are set."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in ("label_studio_api_key", "basic_auth_pass"):
                value = "(set)" if value else ""
            elif f.name in ("redis_url", "label_studio_url"):
                value = redact_url(value)
            elif isinstance(value, Path):
                value = str(value)
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        out["api_key_kind"] = self.api_key_kind
        return out

    def __repr__(self) -> str:
        shown = ", ".join(f"{k}={v!r}" for k, v in self.public().items())
        return f"Settings({shown})"


def looks_like_token(value: object) -> bool:
    """A legacy token or a JWT as Label Studio issues them: token characters only (never
    a CR/LF that would break every request it goes into), of a sane length."""
    if not isinstance(value, str) or not 16 <= len(value) <= 4096:
        return False
    return bool(_HEX40.fullmatch(value) or _TOKEN_CHARS.fullmatch(value)
                or _JWT.fullmatch(value))
def default_job_timeout(cycle_budget: int) -> int:
    """JOB_TIMEOUT when unset: the training budget plus JOB_MARGIN_S, at least 2 h; a day
    when training has no budget."""
    if cycle_budget <= 0:
        return 24 * 3600
    return max(7200, cycle_budget + JOB_MARGIN_S)


def redact_url(url: str) -> str:
    """The URL fit for logs and replies: user information (``user:password@``, or a lone
    ``password@`` as Redis URLs allow) and every query value (``?password=``) replaced
    by ***; the user name is kept when a password follows it."""
    if not url:
        return url
    try:
        parts = urlsplit(url)
    except ValueError:
        return "(a malformed URL)"
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, host = netloc.rsplit("@", 1)
        user, has_password, _ = userinfo.partition(":")
        netloc = f"{user}:***@{host}" if has_password else f"***@{host}"
    query = "&".join(
        f"{key}=***" if has_value else key
        for key, has_value, _ in (item.partition("=") for item in parts.query.split("&") if item)
    )
    if (netloc, query) == (parts.netloc, parts.query):
        return url
    return urlunsplit(parts._replace(netloc=netloc, query=query))


class _Reader:
    """Reads one variable at a time; every error names the variable."""

    def __init__(self, env: Mapping[str, str]):
        self.env = env

    def raw(self, name: str) -> str | None:
        value = self.env.get(name)
        if value is None:
            return None
        value = value.strip()
        return value or None

    def _parse(self, name: str, default, parse: Callable[[str], Any]):
        value = self.raw(name)
        if value is None:
            return default
        try:
            return parse(value)
        except SettingsError:
            raise
        except (ValueError, TypeError) as exc:
            raise SettingsError(f"{name}: {exc}") from None

    def text(self, name: str, default: str) -> str:
        return self._parse(name, default, str)

    def boolean(self, name: str, default: bool) -> bool:
        def parse(value: str) -> bool:
            lowered = value.strip().lower()
            if lowered not in _BOOLEANS:
                raise ValueError(f"must be true or false (1/0, yes/no, on/off); got {value!r}")
            return _BOOLEANS[lowered]

        return self._parse(name, default, parse)

    def integer(self, name: str, default: int, minimum: int = 0) -> int:
        def parse(value: str) -> int:
            try:
                number = int(value.replace("_", ""))
            except ValueError:
                raise ValueError(f"expected a whole number, got {value!r}") from None
            if number < minimum:
                raise ValueError(f"must be at least {minimum}, got {number}")
            return number

        return self._parse(name, default, parse)

    def fraction(self, name: str, default: float) -> float:
        def parse(value: str) -> float:
            try:
                number = float(value)
            except ValueError:
                raise ValueError(f"expected a number in [0, 1), got {value!r}") from None
            if not (0.0 <= number < 1.0) or math.isnan(number):
                raise ValueError(f"must be in [0, 1), got {value}")
            return number

        return self._parse(name, default, parse)

    def size(self, name: str, default: int) -> int:
        """Bytes: a whole number, or with a K/M/G suffix (KB, MB, MiB, ...: powers of 1024)."""

        def parse(value: str) -> int:
            match = _SIZE.fullmatch(value)
            if not match:
                raise ValueError(f"expected bytes like 31457280 or 30MB, got {value!r}")
            number = float(match.group(1)) * 1024 ** " KMG".index(match.group(2).upper() or " ")
            if number < 1:
                raise ValueError(f"must be positive, got {value!r}")
            return int(number)

        return self._parse(name, default, parse)

    def count(self, name: str, default: int) -> int:
        """A positive count, whole or with a K/M/G suffix (powers of 1000): 40M, 40000000."""

        def parse(value: str) -> int:
            match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?)\s*", value, re.IGNORECASE)
            if not match:
                raise ValueError(f"expected a count like 40000000 or 40M, got {value!r}")
            number = float(match.group(1)) * 1000 ** " KMG".index(match.group(2).upper() or " ")
            if number < 1:
                raise ValueError(f"must be positive, got {value!r}")
            return int(number)

        return self._parse(name, default, parse)

    def choice(self, name: str, default: str, options, upper: bool = False) -> str:
        def parse(value: str) -> str:
            value = value.upper() if upper else value.lower()
            if value not in options:
                raise ValueError(f"must be one of {', '.join(options)}; got {value!r}")
            return value

        return self._parse(name, default, parse)

    def pattern(self, name: str, default: str, regex: re.Pattern, what: str) -> str:
        def parse(value: str) -> str:
            if not regex.fullmatch(value):
                raise ValueError(f"only {what} allowed, got {value!r}")
            return value

        return self._parse(name, default, parse)

    def path(self, name: str, default: Path) -> Path:
        return self._parse(name, default, lambda v: Path(v).expanduser())

    def url(self, name: str, default: str) -> str:
        def parse(value: str) -> str:
            parts = urlsplit(value)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError("expected an http(s) URL like http://host:8080, got "
                                 f"{redact_url(value)!r}")
            try:
                parts.port  # noqa: B018  (raises on a malformed port)
            except ValueError:
                raise ValueError(f"malformed port in {redact_url(value)!r}") from None
            return value.rstrip("/")

        return self._parse(name, default, parse)

    def hosts(self, name: str) -> tuple[str, ...]:
        def parse(value: str) -> tuple[str, ...]:
            hosts = []
            for item in value.split(","):
                item = item.strip().lower()
                if not item:
                    continue
                if "://" in item:
                    item = urlsplit(item).netloc
                if not _HOST.fullmatch(item):
                    shown = redact_url(f"//{item}")[2:]  # never echo user:password@
                    raise ValueError(f"expected host or host:port names, got {shown!r}")
                hosts.append(item)
            return tuple(hosts)

        return self._parse(name, (), parse)

    def device(self, name: str) -> str:
        def parse(value: str) -> str:
            value = value.lower()
            if value in DEVICES or re.fullmatch(r"cuda:\d+", value):
                return value
            raise ValueError(f"must be auto, cpu, cuda or cuda:N; got {value!r}")

        return self._parse(name, "auto", parse)

    def backbone(self, name: str) -> str:
        def parse(value: str) -> str:
            if value.lower() in ("auto", "imagenet", "none"):
                return value.lower()
            path = Path(value).expanduser()
            if not path.is_file():
                raise ValueError(
                    f"expected auto, imagenet, none or the path of a weights file; "
                    f"{str(path)!r} is not a file"
                )
            return str(path)

        return self._parse(name, "auto", parse)

    def redis_url(self, name: str) -> str:
        def parse(value: str) -> str:
            parts = urlsplit(value)
            if parts.scheme not in ("redis", "rediss", "unix"):
                raise ValueError(
                    f"expected redis://host:6379/0, rediss://... or unix://...; "
                    f"got {redact_url(value)!r}"
                )
            if parts.scheme != "unix" and not parts.hostname:
                raise ValueError(f"no host in {redact_url(value)!r}")
            return value

        return self._parse(name, "", parse)

    def api_key(self, name: str) -> str:
        # never put the key itself in a message
        value = self.raw(name)
        if value is None:
            return ""
        if value.lower().startswith(("token ", "bearer ")):
            raise SettingsError(
                f"{name}: give the key alone, without the 'Token '/'Bearer ' prefix"
            )
        if _JWT.fullmatch(value):
            _check_jwt(name, value)
            return value
        if _HEX40.fullmatch(value) or (_TOKEN_CHARS.fullmatch(value) and len(value) >= 16):
            return value
        raise SettingsError(
            f"{name}: expected a legacy token (40 hex characters) or a personal access "
            f"token (a JWT from Label Studio's Account & Settings); got {len(value)} "
            f"characters that are neither"
        )


def _check_jwt(name: str, token: str) -> None:
    try:
        part = token.split(".")[1]
        payload = json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))
    except (binascii.Error, ValueError, IndexError):
        raise SettingsError(f"{name}: looks like a JWT but its payload does not decode") from None
    if not isinstance(payload, dict):
        raise SettingsError(f"{name}: looks like a JWT but its payload is not an object")
    exp = payload.get("exp")
    if exp is None:
        raise SettingsError(f"{name}: the personal access token has no expiry; create a new one")
    if isinstance(exp, (int, float)) and exp < time.time():
        when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(exp))
        raise SettingsError(f"{name}: the personal access token expired on {when}")
