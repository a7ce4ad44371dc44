"""Entry point of the s4al backend.

    gunicorn --workers 1 --threads 8 --bind 0.0.0.0:9090 _wsgi:app
    python _wsgi.py --port 9090          (one process, threaded; no Redis needed)

Every setting comes from the environment (see s4al_backend/settings.py); a malformed one
stops the start with a message naming the variable.
"""

from __future__ import annotations

import argparse
import logging
import sys

from s4al_backend.app import create_app
from s4al_backend.settings import Settings, SettingsError
from s4al_backend.startup import listen_line, log_studio

LOG_FORMAT = "[%(asctime)s] [%(levelname)s] [%(name)s] %(message)s"


def _settings() -> Settings:
    try:
        return Settings.from_env()
    except SettingsError as exc:
        print(f"s4al-backend: configuration error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def _configure_logging(level: str) -> None:
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(level=level, format=LOG_FORMAT)
    root.setLevel(level)


settings = _settings()
_configure_logging(settings.log_level)
app = create_app(settings)
logging.getLogger("s4al_backend").info("settings: %r", settings)
log_studio(settings)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="s4al Label Studio ML backend")
    parser.add_argument("--host", default="0.0.0.0",
                        help="address to bind (default 0.0.0.0)")
    parser.add_argument("-p", "--port", type=int, default=9090, help="port (default 9090)")
    parser.add_argument("--debug", action="store_true",
                        help="Flask debug mode (never in production)")
    args = parser.parse_args(argv)
    # the app logs every request itself; werkzeug's own access lines would repeat them
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    logging.getLogger("s4al_backend").info(listen_line(args.host, args.port))
    app.run(host=args.host, port=args.port, debug=args.debug, threaded=True, use_reloader=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
