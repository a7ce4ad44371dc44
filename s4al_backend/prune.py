"""Old versions' predictions deleted, so Label Studio's database stays bounded.

A cycle pushes one prediction of its version to each task that needs one (`acquire.py`:
the tasks without a full annotation, and open region tasks), ~70-140 KB each. Without
pruning every cycle would add that much per task for good. After the push,
`prune_predictions` keeps this backend's newest PREDICTION_VERSIONS versions in the
project (the new one first among them) and deletes every prediction of the older ones,
one request per version (`DELETE /api/projects/<id>/model-versions/`). Versions another
source made (not named like `store.ModelStore`'s), and the version the project's
`model_version` selects, are never touched. PREDICTION_VERSIONS=0 keeps everything.
Pruning is housekeeping: when Label Studio refuses it, the cycle logs why and still ends
done (its version and predictions are in), and the next cycle tries again.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from .studio import Studio, StudioError

log = logging.getLogger(__name__)

VERSION_NAME = re.compile(r"v(\d+)-(\d{8}-\d{6})")  # store.ModelStore's version names


def is_our_version(value: Any) -> bool:
    return isinstance(value, str) and bool(VERSION_NAME.fullmatch(value))


def stale_versions(versions: list[str], keep: int, protect: set[str]) -> list[str]:
    """Our versions beyond the newest `keep`, minus `protect`. Newest by the time in the
    name, then the sequence number: a fresh MODEL_DIR starts again at v0001."""
    ours = sorted((v for v in versions if is_our_version(v)), key=_age, reverse=True)
    return [v for v in ours[keep:] if v not in protect]


def _age(version: str) -> tuple[str, int]:
    match = VERSION_NAME.fullmatch(version)
    return match.group(2), int(match.group(1))


def prune_predictions(studio: Studio, project: int, keep: int, protect: set[str]) -> list[str]:
    """Delete the predictions of our versions older than the newest `keep` (0: none);
    returns the versions deleted."""
    if keep <= 0:
        return []
    done: list[str] = []
    try:
        for version in stale_versions(list(studio.model_versions(project)), keep, protect):
            deleted = studio.delete_model_version(project, version)
            done.append(version)
            log.info("project %s: %d predictions of %s deleted (PREDICTION_VERSIONS=%d)",
                     project, deleted, version, keep)
    except StudioError as exc:
        log.warning("project %s: old predictions not deleted (the next cycle tries again): "
                    "%s", project, exc)
    return done
