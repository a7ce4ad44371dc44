"""Versioned model checkpoints on disk and the ``current`` pointer.

Layout (one store per Label Studio project, plus a shared one)::

    MODEL_DIR/versions/<version>.pt              shared store: a model trained offline
    MODEL_DIR/versions/<version>.json            (python -m s4al_backend.store import ...)
    MODEL_DIR/current
    MODEL_DIR/projects/<project id>/versions/<version>.pt
    MODEL_DIR/projects/<project id>/versions/<version>.json
    MODEL_DIR/projects/<project id>/current

``current`` is a one-line text file naming the current version, replaced atomically
(temp file, fsync, rename), so every process (web workers, RQ workers) sees the old or
the new version, never a half-written one; checkpoints are written the same way by
``model.checkpoint.save_checkpoint`` before the pointer moves. Beside each checkpoint a
small JSON file holds its JSON-safe metadata (version, classes, created, metrics, ...), so
that /setup, which Label Studio gives 3 s, learns a version's classes without torch.
A project uses its own
current version, or the shared store's when it has none yet. The last ``keep`` versions
stay; older ones are deleted (never the current one).

Version names: ``v<seq>-<UTC yyyymmdd-HHMMSS>``, e.g. ``v0003-20260101-120000``; the
sequence orders them.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from model.atomic import atomic_write, atomic_write_bytes

__all__ = ["ModelStore", "project_key", "project_store", "resolve_current", "shared_store"]

logger = logging.getLogger(__name__)

_VERSION = re.compile(r"v(\d+)-[0-9A-Za-z._-]+")
_PROJECT = re.compile(r"[0-9A-Za-z_-]{1,64}")  # a folder name: never too long for one
CHECKPOINT_SUFFIX = ".pt"
STALE_TEMP_S = 3600  # a temp file this old belongs to a write that was killed
META_SUFFIX = ".json"


def project_key(project: Any) -> str | None:
    """Label Studio's project reference -> its id as a string: ``"12.1700000000"`` (what
    /setup and /predict send) -> ``"12"``; ``{"id": 12, ...}`` (webhooks) -> ``"12"``;
    ``12`` -> ``"12"``. None / empty -> None. Raises ValueError for anything else."""
    if isinstance(project, dict):
        project = project.get("id")
    if project is None or project == "":
        return None
    if isinstance(project, bool):
        raise ValueError(f"not a project id: {project!r}")
    key = str(project).split(".", 1)[0].strip()
    if not _PROJECT.fullmatch(key):
        raise ValueError(f"not a project id: {str(project)[:40]!r}")
    return key


class ModelStore:
    """Checkpoints under ``root/versions`` and the ``root/current`` pointer."""

    def __init__(self, root: str | Path, keep: int = 5):
        if keep < 1:
            raise ValueError("keep must be at least 1")
        self.root = Path(root)
        self.keep = keep

    def __repr__(self) -> str:
        return f"ModelStore({str(self.root)!r}, keep={self.keep})"

    @property
    def versions_dir(self) -> Path:
        return self.root / "versions"

    @property
    def pointer(self) -> Path:
        return self.root / "current"

    def path(self, version: str) -> Path:
        if not _VERSION.fullmatch(version):
            raise ValueError(f"not a version name: {version!r}")
        return self.versions_dir / f"{version}{CHECKPOINT_SUFFIX}"

    def meta_path(self, version: str) -> Path:
        return self.path(version).with_suffix(META_SUFFIX)

    def meta(self, version: str | None = None) -> dict | None:
        """A version's JSON-safe metadata (``version``, ``classes``, ``created``,
        ``metrics``, ...) without loading the checkpoint; None when the version has no
        side file (checkpoints copied in by hand) or it is unreadable."""
        version = version or self.current()
        if version is None:
            return None
        try:
            meta = json.loads(self.meta_path(version).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return meta if isinstance(meta, dict) and isinstance(meta.get("classes"), list) else None

    def write_meta(self, version: str, meta: dict) -> None:
        """Write the side file of ``version`` (values that are not JSON are left out)."""
        plain = {}
        for key, value in meta.items():
            try:
                json.dumps(value)
            except (TypeError, ValueError):
                continue
            plain[key] = value
        plain["version"] = version
        atomic_write_bytes(self.meta_path(version), json.dumps(plain, indent=1).encode("utf-8"))

    def versions(self) -> list[str]:
        """Stored versions, oldest first."""
        if not self.versions_dir.is_dir():
            return []
        found = []
        for entry in self.versions_dir.iterdir():
            name = entry.name
            if not name.endswith(CHECKPOINT_SUFFIX):
                continue
            version = name[: -len(CHECKPOINT_SUFFIX)]
            match = _VERSION.fullmatch(version)
            if match:
                found.append((int(match.group(1)), version))
        return [v for _, v in sorted(found)]

    def current(self) -> str | None:
        """The current version, or None (no pointer, or it names a missing file)."""
        try:
            version = self.pointer.read_text(encoding="utf-8").strip()
        except (FileNotFoundError, NotADirectoryError):
            return None
        if not version or not _VERSION.fullmatch(version):
            logger.warning("%s holds no version name; ignored", self.pointer)
            return None
        if not self.path(version).is_file():
            logger.warning("%s names %s, whose checkpoint is missing", self.pointer, version)
            return None
        return version

    def new_version(self, now: datetime | None = None) -> str:
        """A fresh version name, after every stored one."""
        now = now or datetime.now(timezone.utc)
        seq = 1
        existing = self.versions()
        if existing:
            seq = int(_VERSION.fullmatch(existing[-1]).group(1)) + 1
        return f"v{seq:04d}-{now.strftime('%Y%m%d-%H%M%S')}"

    def set_current(self, version: str) -> None:
        """Point ``current`` at ``version`` (atomic; the checkpoint must exist)."""
        if not self.path(version).is_file():
            raise FileNotFoundError(f"no checkpoint for version {version} in {self.root}")
        atomic_write_bytes(self.pointer, (version + "\n").encode("utf-8"))

    def prune(self) -> list[str]:
        """Delete all but the newest ``keep`` versions, never the current one, and the
        temp files of writes that a killed process left behind."""
        self.remove_stale_temp_files()
        current = self.current()
        versions = self.versions()
        removed = []
        for version in versions[: max(0, len(versions) - self.keep)]:
            if version == current:
                continue
            try:
                self.path(version).unlink()
                removed.append(version)
            except FileNotFoundError:
                pass
            self.meta_path(version).unlink(missing_ok=True)
        return removed

    def remove_stale_temp_files(self, older_than_s: float = STALE_TEMP_S) -> list[Path]:
        """``.<name>.<random>.tmp`` files (model.atomic's) last written over
        ``older_than_s`` ago: a write killed midway. A live write is seconds old."""
        removed = []
        cutoff = time.time() - older_than_s
        for folder in (self.root, self.versions_dir):
            for path in folder.glob(".*.tmp") if folder.is_dir() else ():
                try:
                    if path.stat().st_mtime < cutoff:
                        path.unlink()
                        removed.append(path)
                except FileNotFoundError:
                    continue
        if removed:
            logger.warning("removed %d temp file(s) of interrupted writes in %s", len(removed),
                           self.root)
        return removed

    def save(self, model, classes: list[str], meta: dict[str, Any] | None = None,
             version: str | None = None) -> str:
        """Write a checkpoint as a new version, make it current, prune. Returns the
        version. ``meta`` gets ``version`` set (model.checkpoint adds ``created``)."""
        from model.checkpoint import save_checkpoint

        version = version or self.new_version()
        meta = {**(meta or {}), "version": version}
        save_checkpoint(self.path(version), model, list(classes), meta)
        self.write_meta(version, {**meta, "classes": list(classes),
                                  "created": datetime.now(timezone.utc).isoformat()})
        self.set_current(version)
        self.prune()
        return version

    def adopt(self, checkpoint: str | Path) -> str:
        """Copy an existing checkpoint file in (checked to load) as a new current version."""
        from model.checkpoint import load_checkpoint

        checkpoint = Path(checkpoint)
        _, meta = load_checkpoint(checkpoint, "cpu")  # CheckpointError when it is not one
        version = self.new_version()
        target = self.path(version)
        target.parent.mkdir(parents=True, exist_ok=True)
        with checkpoint.open("rb") as source:
            atomic_write(target, lambda file: shutil.copyfileobj(source, file))
        self.write_meta(version, {k: v for k, v in meta.items() if k != "train_state"})
        self.set_current(version)
        self.prune()
        return version

    def load(self, version: str | None = None, device: str = "cpu"):
        """``(model, meta)`` of ``version`` (default: the current one)."""
        from model.checkpoint import load_checkpoint

        version = version or self.current()
        if version is None:
            raise FileNotFoundError(f"no current model version in {self.root}")
        return load_checkpoint(self.path(version), device)

    def networks(self, version: str, device: str = "cpu"):
        """``(student, served, train_state)`` of ``version``: the served network, and the
        student from its train state (the served one when the state has none)."""
        model, meta = self.load(version, device)
        state = meta.get("train_state") or {}
        student = model
        if state.get("student"):
            from model.network import network_from_weights

            student = network_from_weights(state["student"], len(meta["classes"]), device)
        return student, model, state


def shared_store(model_dir: str | Path, keep: int = 5) -> ModelStore:
    return ModelStore(Path(model_dir), keep)


def project_store(model_dir: str | Path, project: Any, keep: int = 5) -> ModelStore:
    """The store of one Label Studio project (``project`` as project_key accepts it)."""
    key = project_key(project)
    if key is None:
        raise ValueError("a project store needs a project id")
    return ModelStore(Path(model_dir) / "projects" / key, keep)


def resolve_current(model_dir: str | Path, project: Any, keep: int = 5
                    ) -> tuple[ModelStore, str] | None:
    """The store and version a project predicts with: its own current version, else the
    shared store's, else None (nothing trained yet)."""
    key = project_key(project)
    stores = [project_store(model_dir, key, keep)] if key else []
    stores.append(shared_store(model_dir, keep))
    for store in stores:
        version = store.current()
        if version is not None:
            return store, version
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m s4al_backend.store",
        description="List the model versions in MODEL_DIR, or import a checkpoint trained "
        "offline (python -m model.train) as the current version.",
    )
    parser.add_argument("--model-dir", default=os.environ.get("MODEL_DIR") or "model_dir")
    parser.add_argument("--project", help="a Label Studio project id (default: the shared "
                        "store, used by every project without a model of its own)")
    parser.add_argument("--keep", type=int, default=int(os.environ.get("KEEP_VERSIONS") or 5))
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="list versions, the current one marked *")
    add = sub.add_parser("import", help="copy a checkpoint in and make it current")
    add.add_argument("checkpoint")
    args = parser.parse_args(argv)
    store = (project_store(args.model_dir, args.project, args.keep) if args.project
             else shared_store(args.model_dir, args.keep))
    if args.command == "import":
        print(store.adopt(args.checkpoint))
        return 0
    current = store.current()
    for version in store.versions():
        print(("* " if version == current else "  ") + version)
    return 0


if __name__ == "__main__":
    sys.exit(main())
