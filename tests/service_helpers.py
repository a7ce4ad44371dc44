"""Shared helpers for service tests: a real local HTTP server standing in for Label
Studio's file serving (with its auth checks), label configs, checkpoints, settings."""

from __future__ import annotations

import base64
import json
import sys
import threading
import time
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import cv2
import numpy as np

from s4al_backend.settings import Settings

LEGACY_KEY = "0123456789abcdef0123456789abcdef01234567"
CAMVID_CLASSES = ["Sky", "Building", "Pole", "Road", "Pavement", "Tree", "SignSymbol",
                  "Fence", "Car", "Pedestrian", "Bicyclist"]


def brush_config(classes=CAMVID_CLASSES, region: bool = True, polygons=None) -> str:
    labels = "".join(f'<Label value="{c}"/>' for c in classes)
    extra = ""
    if polygons:
        extra += '<PolygonLabels name="poly" toName="image">' + "".join(
            f'<Label value="{c}"/>' for c in polygons) + "</PolygonLabels>"
    if region:
        extra += '<Rectangle name="region" toName="image"/>'
    return (
        '<View><Image name="image" value="$image" zoom="true"/>'
        f'<BrushLabels name="tag" toName="image">{labels}</BrushLabels>{extra}</View>'
    )


def png_bytes(image: np.ndarray) -> bytes:
    ok, data = cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    assert ok
    return data.tobytes()


def read_rgb(path: Path) -> np.ndarray:
    return cv2.cvtColor(cv2.imread(str(path), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def make_jwt(payload: dict) -> str:
    def part(obj) -> str:
        raw = json.dumps(obj, separators=(",", ":")).encode()
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

    return f"{part({'alg': 'HS256', 'typ': 'JWT'})}.{part(payload)}.c2lnbmF0dXJl"


def personal_access_token(lifetime_s: float = 3600) -> str:
    return make_jwt({"token_type": "refresh", "exp": int(time.time() + lifetime_s), "jti": "r1"})


class FileServer:
    """Label Studio's file serving on 127.0.0.1, in a thread.

    ``files``: path (with query, as requested) -> bytes. Paths under ``/data/`` need the
    ``Authorization`` header Label Studio would accept: ``Token <LEGACY_KEY>`` or
    ``Bearer <access>`` for an access token this server handed out at
    ``/api/token/refresh/``. ``/public/...`` needs nothing. ``/redirect?to=<url>`` answers
    302; ``/status/<code>`` answers that code; ``/slow/<n>?every=<s>`` trickles n bytes,
    one every s seconds. Every request is recorded in ``requests``
    as ``(method, path, authorization header or None)``.
    """

    def __init__(self, token: str = LEGACY_KEY):
        self.files: dict[str, bytes] = {}
        self.token = token
        self.access_tokens: set[str] = set()
        self.requests: list[tuple[str, str, str | None]] = []
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep test output quiet
                pass

            def _send(self, code: int, body: bytes = b"", headers=None):
                self.send_response(code)
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _trickle(self, size: int, every: float):
                """``size`` bytes announced, then sent one every ``every`` seconds."""
                self.send_response(200)
                self.send_header("Content-Length", str(size))
                self.end_headers()
                for _ in range(size):
                    self.wfile.write(b"x")
                    self.wfile.flush()
                    time.sleep(every)

            def do_POST(self):
                auth = self.headers.get("Authorization")
                with server.lock:
                    server.requests.append(("POST", self.path, auth))
                length = int(self.headers.get("Content-Length") or 0)
                data = json.loads(self.rfile.read(length) or b"{}")
                refresh = self.path.rstrip("/") == "/api/token/refresh"
                if refresh and data.get("refresh") == server.token:
                    access = make_jwt({"token_type": "access", "exp": int(time.time() + 300),
                                       "jti": f"a{len(server.access_tokens)}"})
                    server.access_tokens.add(access)
                    self._send(200, json.dumps({"access": access}).encode(),
                               {"Content-Type": "application/json"})
                else:
                    self._send(401, b'{"detail": "invalid refresh token"}',
                               {"Content-Type": "application/json"})

            def do_GET(self):
                auth = self.headers.get("Authorization")
                with server.lock:
                    server.requests.append(("GET", self.path, auth))
                parts = urlsplit(self.path)
                if parts.path == "/redirect":
                    target = parse_qs(parts.query)["to"][0]
                    return self._send(302, b"", {"Location": target})
                if parts.path.startswith("/status/"):
                    return self._send(int(parts.path.rsplit("/", 1)[1]), b"nope")
                if parts.path.startswith("/slow/"):
                    return self._trickle(int(parts.path.rsplit("/", 1)[1]),
                                         float(parse_qs(parts.query)["every"][0]))
                if parts.path.startswith("/data/") and not server.authorized(auth):
                    return self._send(401, b'{"detail": "no credentials"}',
                                      {"Content-Type": "application/json"})
                body = server.files.get(self.path)
                if body is None:
                    return self._send(404, b"not found")
                return self._send(200, body, {"Content-Type": "image/png"})

        class Server(ThreadingHTTPServer):
            def handle_error(self, request, client_address):
                # clients hanging up mid-body (size caps) are expected here
                if not isinstance(sys.exc_info()[1], ConnectionError):
                    super().handle_error(request, client_address)

        self.httpd = Server(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,),
                                       daemon=True)

    def authorized(self, header: str | None) -> bool:
        if not header:
            return False
        if header == f"Token {self.token}":
            return True
        return header.startswith("Bearer ") and header[7:] in self.access_tokens

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def host(self) -> str:
        return urlsplit(self.url).netloc

    def add(self, path: str, data: bytes) -> str:
        self.files[path] = data
        return path

    def count(self, path: str) -> int:
        with self.lock:
            return sum(1 for _, p, _ in self.requests if p == path)

    def __enter__(self) -> FileServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


def make_settings(tmp_path: Path, server: FileServer | None = None, **overrides) -> Settings:
    base = Settings(
        label_studio_url=server.url if server else "http://127.0.0.1:9",
        label_studio_api_key=LEGACY_KEY,
        model_dir=tmp_path / "model_dir",
        image_cache_dir=tmp_path / "model_dir" / "image_cache",
        device="cpu",
        backbone_weights="none",
        first_version=False,  # one version per cycle; tests/test_first_version.py covers it
    )
    return replace(base, **overrides)


def make_model(num_classes: int, seed: int = 0):
    """A small random DeepLabV3Plus (no weights downloaded), deterministic per seed."""
    import torch

    from model.network import DeepLabV3Plus

    torch.manual_seed(seed)
    return DeepLabV3Plus(num_classes, backbone_weights=None).eval()
