"""Fetching task images from Label Studio: URL resolution, host allow-list, auth, size
caps, a disk cache keyed by URL.

- Relative URLs (``/data/upload/...``, ``/data/local-files/?d=...``, ``/storage-data/...``)
  are joined to LABEL_STUDIO_URL. Cloud URIs (``s3://``, ``gs://``, ``azure-blob://``) go
  through Label Studio's ``/tasks/<id>/presign/?fileuri=`` endpoint.
- Only Label Studio's host and the hosts in ALLOWED_IMAGE_HOSTS are fetched, redirects
  included (followed by hand, each hop checked). The API key is sent to Label Studio's
  host only: ``Token <key>`` for a legacy key, ``Bearer <access>`` for a personal access
  token, exchanged through label_studio_sdk.
- Bodies above MAX_IMAGE_BYTES and images above MAX_IMAGE_PIXELS (read from the header,
  before decoding) are refused.
- The cache stores raw bytes under IMAGE_CACHE_DIR, one file per URL (sha256), written
  atomically; past IMAGE_CACHE_MB the least recently used files go. URLs are assumed to
  name immutable content, as Label Studio's uploads do.
"""

from __future__ import annotations

import base64
import hashlib
import io
import logging
import os
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import quote, urljoin, urlsplit

import cv2
import numpy as np
import requests
import urllib3
from PIL import Image

from .settings import Settings, looks_like_token, redact_url
from .urls import Origin, UnsafeURL, origin_of, parse_host_port

__all__ = [
    "ImageCache",
    "ImageDecodeError",
    "ImageDownloadError",
    "ImageError",
    "ImageFetcher",
    "ImageRefused",
    "ImageTooLarge",
    "LabelStudioAuth",
    "decode_image",
]

logger = logging.getLogger(__name__)

CLOUD_SCHEMES = ("s3", "gs", "azure-blob")
MAX_REDIRECTS = 5
CONNECT_TIMEOUT = 5.0
READ_TIMEOUT = 60.0
_CHUNK = 1 << 16


class ImageError(Exception):
    """A task image that cannot be had; ``status`` is the HTTP status it maps to."""

    status = 422


class ImageRefused(ImageError):
    """The URL is not one this backend may fetch (foreign host, unsupported scheme)."""

    status = 403


class ImageTooLarge(ImageError):
    status = 413


class ImageDownloadError(ImageError):
    """The image host failed or refused (network error, 4xx/5xx)."""

    status = 502

    def __init__(self, message: str, http_status: int | None = None):
        super().__init__(message)
        self.http_status = http_status


class ImageDecodeError(ImageError):
    status = 422


class LabelStudioAuth:
    """The Authorization header for Label Studio: ``Token <key>`` for a legacy key, or
    ``Bearer <access token>`` for a personal access token (a JWT refresh token, exchanged
    at ``/api/token/refresh/`` through label_studio_sdk and refreshed when it expires)."""

    def __init__(self, settings: Settings):
        self._settings = settings
        self._client = None
        self._lock = threading.Lock()
        # the project owner's legacy token from /setup, used only without an API key
        self.fallback_token: str | None = None
        self.fallback_refused = False  # Label Studio answered 401/403 to it

    def __repr__(self) -> str:
        kind = self._settings.api_key_kind
        return f"LabelStudioAuth({redact_url(self._settings.label_studio_url)!r}, {kind})"

    def offer_setup_token(self, token: object) -> str:
        """/setup's token, adopted only without LABEL_STUDIO_API_KEY, only when well-formed
        and only while none is held or Label Studio refused the one held: a caller of
        /setup cannot swap out a working token. Returns adopted / kept / malformed /
        unused."""
        if self._settings.label_studio_api_key:
            return "unused"
        if not looks_like_token(token):
            return "malformed"
        if self.fallback_token is not None and not self.fallback_refused:
            return "kept" if token != self.fallback_token else "adopted"
        self.fallback_token, self.fallback_refused = str(token), False
        return "adopted"

    @property
    def configured(self) -> bool:
        return bool(self._settings.label_studio_api_key or self.fallback_token)

    def header(self) -> dict[str, str]:
        kind = self._settings.api_key_kind
        if kind == "none":
            return {"Authorization": f"Token {self.fallback_token}"} if self.fallback_token else {}
        if kind == "legacy":
            return {"Authorization": f"Token {self._settings.label_studio_api_key}"}
        try:
            with self._lock:
                if self._client is None:
                    from label_studio_sdk.client import LabelStudio

                    self._client = LabelStudio(
                        base_url=self._settings.label_studio_url,
                        api_key=self._settings.label_studio_api_key,
                    )
            # the SDK keeps the access token and refreshes it when it expires
            value = self._client._client_wrapper.get_headers()["Authorization"]
        except Exception as exc:
            detail = getattr(exc, "status_code", None) or type(exc).__name__
            raise ImageDownloadError(
                "could not exchange LABEL_STUDIO_API_KEY (a personal access token) for an "
                "access token at "
                f"{redact_url(self._settings.label_studio_url)}/api/token/refresh/: {detail}",
                http_status=401,
            ) from None
        return {"Authorization": value}


class ImageCache:
    """Raw image bytes on disk, one file per URL, LRU-trimmed to ``max_bytes``."""

    def __init__(self, directory: Path, max_bytes: int):
        self.directory = Path(directory)
        self.max_bytes = int(max_bytes)
        self._lock = threading.Lock()
        self._size: int | None = None  # bytes on disk, as this process last counted

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    def _path(self, key: str) -> Path:
        digest = hashlib.sha256(key.encode("utf-8")).hexdigest()
        return self.directory / digest[:2] / digest

    def get(self, key: str) -> bytes | None:
        if not self.enabled:
            return None
        path = self._path(key)
        try:
            data = path.read_bytes()
        except OSError:
            return None
        try:
            os.utime(path)  # recently used
        except OSError:
            pass
        return data

    def put(self, key: str, data: bytes) -> None:
        if not self.enabled or len(data) > self.max_bytes:
            return
        path = self._path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
            try:
                with os.fdopen(fd, "wb") as handle:
                    handle.write(data)
                os.replace(tmp, path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        except OSError as exc:
            logger.warning("image cache write failed (%s): %s", self.directory, exc)
            return
        with self._lock:
            if self._size is None:
                self._size = self._scan_size()
            else:
                self._size += len(data)
            if self._size > self.max_bytes:
                self._trim()

    def _files(self) -> list[tuple[float, int, Path]]:
        out = []
        if not self.directory.is_dir():
            return out
        for sub in self.directory.iterdir():
            if not sub.is_dir():
                continue
            for path in sub.iterdir():
                if path.name.startswith(".tmp-"):
                    continue
                try:
                    st = path.stat()
                except OSError:
                    continue
                out.append((st.st_mtime, st.st_size, path))
        return out

    def _scan_size(self) -> int:
        return sum(size for _, size, _ in self._files())

    def _trim(self) -> None:
        files = sorted(self._files())  # oldest first
        total = sum(size for _, size, _ in files)
        target = int(self.max_bytes * 0.9)
        for _, size, path in files:
            if total <= target:
                break
            try:
                path.unlink()
                total -= size
            except FileNotFoundError:
                total -= size
            except OSError as exc:
                logger.warning("image cache: cannot remove %s: %s", path, exc)
        self._size = total


def decode_image(data: bytes, max_pixels: int) -> np.ndarray:
    """Image bytes -> uint8 H x W x 3 RGB, EXIF orientation applied (as browsers show
    it). The pixel count is checked from the header before decoding."""
    try:
        with Image.open(io.BytesIO(data)) as header:
            width, height = header.size
    except Image.DecompressionBombError:
        raise ImageTooLarge(
            f"image is over Pillow's decompression-bomb limit ({2 * Image.MAX_IMAGE_PIXELS} "
            f"pixels), past MAX_IMAGE_PIXELS too"
        ) from None
    except Exception:
        raise ImageDecodeError(
            "the bytes are not an image this backend can read (broken or unsupported format)"
        ) from None
    if width * height > max_pixels:
        raise ImageTooLarge(
            f"image is {width}x{height} = {width * height} pixels, over MAX_IMAGE_PIXELS "
            f"({max_pixels})"
        )
    buffer = np.frombuffer(data, dtype=np.uint8)
    image = cv2.imdecode(buffer, cv2.IMREAD_COLOR)
    if image is None:
        # formats OpenCV lacks but Pillow reads
        try:
            with Image.open(io.BytesIO(data)) as pil:
                from PIL import ImageOps

                return np.asarray(ImageOps.exif_transpose(pil).convert("RGB"))
        except Exception:
            raise ImageDecodeError("the image data is broken or truncated") from None
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


class ImageFetcher:
    """Fetches task images for one process (thread-safe)."""

    def __init__(self, settings: Settings, session_factory=requests.Session):
        self.settings = settings
        self.auth = LabelStudioAuth(settings)
        self.cache = ImageCache(settings.image_cache_dir, settings.image_cache_bytes)
        self._session_factory = session_factory
        self._local = threading.local()
        self._ls = origin_of(settings.label_studio_url)
        self._allowed = [parse_host_port(h) for h in settings.allowed_image_hosts]

    # --------------------------------------------------------------- URLs
    def _session(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:
            session = self._session_factory()
            self._local.session = session
        return session

    def resolve(self, url: str, task_id=None) -> str:
        """The absolute http(s) URL to fetch for a task's image URL."""
        if not isinstance(url, str) or not url.strip():
            raise ImageRefused("the task has no image URL")
        url = url.strip()
        scheme = urlsplit(url).scheme.lower()
        if scheme in CLOUD_SCHEMES:
            if task_id is None:
                raise ImageRefused(f"a {scheme}:// image needs the task id to be presigned")
            fileuri = base64.urlsafe_b64encode(url.encode()).decode()
            task = quote(str(task_id), safe="")
            return f"{self.settings.label_studio_url}/tasks/{task}/presign/?fileuri={fileuri}"
        if scheme in ("http", "https"):
            return url
        if scheme == "" and url.startswith("/") and not url.startswith("//"):
            return self.settings.label_studio_url + url
        raise ImageRefused(
            f"unsupported image URL {_short(url)!r}: expected a Label Studio path "
            "(/data/...), an http(s) URL or a cloud storage URI"
        )

    def is_allowed(self, url: str) -> bool:
        try:
            self._checked(url)
        except ImageRefused:
            return False
        return True

    def _checked(self, url: str) -> Origin:
        """The origin ``url`` reaches, if this backend may fetch it; else ImageRefused.
        Label Studio's origin is scheme + host + port; an ALLOWED_IMAGE_HOSTS entry
        without a port allows the scheme's default port only."""
        try:
            origin = origin_of(url)
        except UnsafeURL as exc:
            raise ImageRefused(f"image URL {_short(url)!r} refused: {exc}") from None
        if origin[:3] == self._ls[:3] and origin.userinfo in (None, self._ls.userinfo):
            return origin
        if origin.userinfo is None and any(h.matches(origin) for h in self._allowed):
            return origin
        raise ImageRefused(
            f"image host {origin.netloc!r} is neither Label Studio's ({self._ls.netloc}) "
            "nor in ALLOWED_IMAGE_HOSTS (user:password@ in a URL counts as another host): "
            "not fetched"
        )

    def _is_label_studio(self, origin: Origin) -> bool:
        return origin[:3] == self._ls[:3]

    # --------------------------------------------------------------- fetching
    def fetch_bytes(self, url: str, task_id=None) -> bytes:
        """The image's bytes, from the cache or its host."""
        absolute = self.resolve(url, task_id)
        origin = self._checked(absolute)
        key = url if urlsplit(url).scheme in CLOUD_SCHEMES else absolute
        cached = self.cache.get(key)
        if cached is not None:
            return cached
        data = self._download(origin)
        self.cache.put(key, data)
        return data

    def load(self, url: str, task_id=None) -> np.ndarray:
        """The task image as uint8 H x W x 3 RGB."""
        return decode_image(self.fetch_bytes(url, task_id), self.settings.max_image_pixels)

    def _download(self, origin: Origin) -> bytes:
        """GET the checked URL, following redirects by hand: every hop is checked like the
        first, and credentials go only to a hop on Label Studio's origin. The whole
        download (every hop, the body) has IMAGE_TIMEOUT seconds."""
        deadline = _Deadline(self.settings.image_timeout)
        for _hop in range(MAX_REDIRECTS + 1):
            url = origin.url
            started = time.perf_counter()
            with self._get(origin, deadline) as response:
                if response.is_redirect:
                    target = urljoin(url, response.headers.get("Location", ""))
                    try:
                        origin = self._checked(target)
                    except ImageRefused as exc:
                        raise ImageRefused(f"{_short(url)} redirects elsewhere: {exc}") from None
                    continue
                self._check_response(response, origin)
                data = _read_body(response, url, self.settings.max_image_bytes, deadline)
            logger.debug("fetched %s (%d bytes, %.3f s)", _short(url), len(data),
                         time.perf_counter() - started)
            return data
        raise ImageDownloadError(f"more than {MAX_REDIRECTS} redirects from {_short(url)}")

    def _get(self, origin: Origin, deadline: _Deadline) -> requests.Response:
        headers = self.auth.header() if self._is_label_studio(origin) else {}
        remaining = deadline.remaining(origin.url)
        try:
            return self._session().get(
                origin.url,
                headers=headers,
                stream=True,
                allow_redirects=False,
                timeout=(min(CONNECT_TIMEOUT, remaining), min(READ_TIMEOUT, remaining)),
            )
        except requests.RequestException as exc:
            deadline.remaining(origin.url)  # a timeout past the deadline says so
            raise ImageDownloadError(
                f"cannot reach {_short(origin.url)}: {type(exc).__name__}"
            ) from None

    def _check_response(self, response: requests.Response, origin: Origin) -> None:
        if response.status_code != 200:
            hint = ""
            if response.status_code in (401, 403) and self._is_label_studio(origin):
                self.auth.fallback_refused = self.auth.fallback_token is not None
                hint = " (check LABEL_STUDIO_API_KEY; legacy tokens need " \
                       "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN on the server)"
            raise ImageDownloadError(
                f"{_short(origin.url)} answered HTTP {response.status_code}{hint}",
                http_status=response.status_code,
            )
        limit = self.settings.max_image_bytes
        length = response.headers.get("Content-Length")
        if length and length.isdigit() and int(length) > limit:
            raise ImageTooLarge(f"image is {int(length)} bytes, over MAX_IMAGE_BYTES ({limit})")


class _Deadline:
    """One download's time budget (IMAGE_TIMEOUT), across hops and body reads."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.end = time.monotonic() + seconds

    def remaining(self, url: str) -> float:
        """Seconds left; ImageDownloadError (504) once none are."""
        left = self.end - time.monotonic()
        if left <= 0:
            raise ImageDownloadError(
                f"download of {_short(url)} took longer than IMAGE_TIMEOUT "
                f"({self.seconds} s): the image host is too slow; raise IMAGE_TIMEOUT if "
                "it is expected",
                http_status=504,
            )
        return left


def _read_body(response: requests.Response, url: str, limit: int, deadline: _Deadline) -> bytes:
    """The body, at most ``limit`` bytes, within the deadline. ``read1`` returns whatever
    one socket read brings, so a body trickled a byte at a time still meets the deadline
    (a plain ``read(n)`` waits for all ``n`` bytes); the socket's timeout shrinks to the
    time left before each read."""
    chunks, total = [], 0
    raw = response.raw
    while True:
        _set_socket_timeout(raw, deadline.remaining(url))
        try:
            chunk = raw.read1(_CHUNK, decode_content=True)
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            deadline.remaining(url)
            raise ImageDownloadError(
                f"download of {_short(url)} broke off: {type(exc).__name__}"
            ) from None
        if not chunk:
            return b"".join(chunks)
        total += len(chunk)
        if total > limit:
            raise ImageTooLarge(f"image is over MAX_IMAGE_BYTES ({limit} bytes)")
        chunks.append(chunk)


def _set_socket_timeout(raw, seconds: float) -> None:
    sock = getattr(getattr(raw, "connection", None), "sock", None)
    if sock is not None:
        sock.settimeout(seconds)


def _short(url: str, limit: int = 120) -> str:
    """A URL fit for logs and errors: no credentials, no query (presigned URLs carry
    signatures there) except Label Studio's local-files ``?d=`` path."""
    parts = urlsplit(url)
    netloc = parts.netloc.rsplit("@", 1)[-1]
    text = f"{parts.scheme}://{netloc}{parts.path}" if parts.scheme else url
    if parts.query.startswith("d="):  # Label Studio local files; other queries may sign
        text += "?" + parts.query
    return text if len(text) <= limit else text[: limit - 3] + "..."
