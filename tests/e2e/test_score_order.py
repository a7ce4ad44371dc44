"""Sorting the Data Manager by prediction score, as a Label Studio user does to annotate
the least certain tasks first.

Label Studio 1.23 (open source) computes a task's `predictions_score` in the Data Manager,
and orders by it, only over predictions whose model_version equals the project's
`model_version`. When a backend is connected, Label Studio sets that to the backend's
*title*, so predictions pushed with a version string (v0001-...) get no score there and the
sort does nothing, unless the project's model_version follows each new version.
"""

from __future__ import annotations

import json
import time

import pytest
import requests

from .cycles import wait_cycle
from .studio import Project, create_project


def data_manager_scores(project: Project, ordering: list[str]) -> list[tuple[int, float | None]]:
    """(task id, predictions_score) in the order the Data Manager lists them."""
    query = json.dumps({"ordering": ordering})
    response = requests.get(
        f"{project.ls.url}/api/tasks",
        params={"project": project.id, "fields": "all", "query": query, "page_size": 100},
        headers={"Authorization": f"Token {project.ls.api_key}"}, timeout=60,
    )
    assert response.ok, f"{response.status_code}: {response.text[:300]}"
    body = response.json()
    rows = body["tasks"] if isinstance(body, dict) else body
    return [(int(t["id"]), t.get("predictions_score")) for t in rows]


def test_data_manager_sorts_tasks_by_current_prediction_score(label_studio, backend_stack,
                                                              camvid_images):
    images = camvid_images
    names = sorted(images.images)[:6]
    project = create_project(label_studio, "s4al e2e: sort by score", names)
    stack = backend_stack(TRAIN_AFTER_ANNOTATIONS="2")
    project.connect(stack)
    tasks = project.image_tasks()
    since = time.time()
    for name in names[:2]:
        project.annotate(tasks[name]["id"], images.images[name].mask)
    cycle = wait_cycle(stack, project, since)
    assert cycle["status"] == "done", cycle
    version = cycle["version"]

    current = {}
    done = {int(tasks[name]["id"]) for name in names[:2]}
    for task in project.tasks():  # the annotated tasks need (and get) no pre-label
        mine = [p for p in task.get("predictions") or [] if p["model_version"] == version]
        assert len(mine) == (0 if int(task["id"]) in done else 1), \
            f"task {task['id']}: {task.get('predictions')}"
        if mine:
            current[int(task["id"])] = mine[0]["score"]

    listed = data_manager_scores(project, ["tasks:predictions_score"])
    print(f"[e2e] Data Manager order by score: {listed}")
    assert sorted(i for i, _ in listed) == sorted({*current, *done})
    listed = [(task_id, score) for task_id, score in listed if task_id not in done]
    for task_id, score in listed:
        assert score is not None, f"task {task_id} has no score in the Data Manager"
        assert score == pytest.approx(current[task_id], abs=1e-4)
    scores = [s for _, s in listed]
    assert scores == sorted(scores), "lowest score (least certain) first"
