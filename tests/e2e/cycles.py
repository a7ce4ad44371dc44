"""Watching the backend's training jobs through its own routes (`/status`, `/setup`)."""

from __future__ import annotations

import time

import requests

from .conftest import BackendStack
from .studio import Project, wait_for


def training(stack: BackendStack, project: Project) -> dict:
    status = stack.status(project.id)
    assert isinstance(status.get("training"), dict), f"/status has no training part: {status}"
    return status["training"]


def wait_cycle(stack: BackendStack, project: Project, since: float, timeout: float = 420,
               idle: bool = True) -> dict:
    """The first cycle record (`/status` -> training.last) finished after `since` (a
    time.time()); with `idle`, also wait until nothing is queued or running."""

    def finished():
        state = training(stack, project)
        last = state.get("last") or {}
        if float(last.get("finished_at") or 0) < since:
            return None
        if idle and last.get("status") != "failed" and (state.get("queued")
                                                        or state.get("running")):
            return None
        return last

    return wait_for(finished, timeout, f"a training cycle of project {project.id} finished "
                    f"after {time.strftime('%H:%M:%S', time.localtime(since))}",
                    interval=2.0, details=lambda: f"{training(stack, project)}\n{stack.logs()}")


def setup_version(stack: BackendStack, project: Project) -> str:
    """What Label Studio's /setup call gets back: the model version it will ask for."""
    config = project.client.projects.get(id=project.id).label_config
    response = requests.post(f"{stack.url}/setup", json={
        "project": f"{project.id}.{int(time.time())}", "schema": config,
        "hostname": project.ls.url, "access_token": project.ls.api_key,
    }, timeout=30)
    assert response.ok, f"/setup -> {response.status_code}: {response.text[:300]}"
    return response.json()["model_version"]
