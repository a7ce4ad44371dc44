"""What the start-up log says: where the server listens, which Label Studio it talks to,
and whether a key is set (never the key itself)."""

from __future__ import annotations

import logging
from typing import Any

from .settings import redact_url

log = logging.getLogger("s4al_backend")


def studio_lines(settings: Any) -> list[tuple[int, str]]:
    """(log level, message) pairs about the Label Studio connection."""
    kind = settings.api_key_kind
    key = "no API key" if kind == "none" else f"API key set ({kind})"
    lines = [(logging.INFO, f"Label Studio: {redact_url(settings.label_studio_url)}, {key}")]
    if kind == "none":
        lines.append((logging.WARNING, "LABEL_STUDIO_API_KEY is not set: training cannot read "
                      "Label Studio (predictions use the token /setup sends, if any)"))
    return lines


def log_studio(settings: Any) -> None:
    for level, message in studio_lines(settings):
        log.log(level, message)


def listen_line(host: str, port: int) -> str:
    if host in ("0.0.0.0", "::", ""):
        return f"listening on http://{host or '0.0.0.0'}:{port} (every interface; " \
               f"http://localhost:{port} from this machine)"
    return f"listening on http://{host}:{port}"
