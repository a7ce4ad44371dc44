"""What a cycle reads of Label Studio 1.23, and how it drops old predictions, checked on the
real server (s4al_backend.studio's docstring says why these calls):

- `GET /api/tasks/?fields=all&include=id,data,annotations,predictions_model_versions`
  returns the annotations and the versions each task holds, never the predictions: the
  bytes of a page do not grow with the number of versions pushed.
- `GET /api/projects/<id>/model-versions/` counts the predictions per version;
  `DELETE` with `{"model_version"}` deletes exactly that version's predictions.
"""

from __future__ import annotations

import requests

from s4al_backend.labels import LabelMap, mask_to_results
from s4al_backend.studio import CYCLE_FIELDS, TASK_FIELDS, Studio, task_model_versions

from .studio import create_project

OURS = ("v0001-20260101-000000", "v0002-20260102-000000")
FOREIGN = "sam-1"


def page_bytes(project, **params) -> int:
    response = requests.get(
        f"{project.ls.url}/api/tasks/",
        params={"project": project.id, "page_size": 100, **params},
        headers={"Authorization": f"Token {project.ls.api_key}"}, timeout=60)
    assert response.ok, f"{response.status_code}: {response.text[:300]}"
    return len(response.content)


def push_versions(studio: Studio, project, tasks: list[dict], versions) -> None:
    label_map = LabelMap.from_config(project.client.projects.get(project.id).label_config)
    images = project.images.images
    for version in versions:
        studio.import_predictions(project.id, [{
            "task": t["id"], "model_version": version, "score": 0.5,
            "result": mask_to_results(images[name].mask, label_map),
        } for name, t in tasks])


def test_the_cycle_read_carries_annotations_and_versions_but_no_predictions(label_studio):
    names = sorted(label_studio.images.images)[:3]
    project = create_project(label_studio, "s4al e2e: light read", names)
    tasks = sorted(project.image_tasks().items())
    annotated = tasks[0][1]["id"]
    project.annotate(annotated, label_studio.images.images[tasks[0][0]].mask)
    studio = Studio(label_studio.url, label_studio.api_key)
    light = {"fields": "all", "include": CYCLE_FIELDS}
    before = page_bytes(project, **light)

    push_versions(studio, project, tasks, (*OURS, FOREIGN))

    read = {t["id"]: t for t in studio.iter_tasks(project.id)}
    assert set(read) == {t["id"] for _, t in tasks}
    for task in read.values():
        assert set(task) <= set(CYCLE_FIELDS.split(","))
        assert "image" in task["data"]
        assert task_model_versions(task) == {*OURS, FOREIGN}
    (annotation,) = read[annotated]["annotations"]
    assert {"id", "result", "was_cancelled", "ground_truth", "updated_at"} <= set(annotation)
    assert annotation["result"] and isinstance(annotation["id"], int)
    assert all(not t["annotations"] for tid, t in read.items() if tid != annotated)
    bare = {t["id"]: t for t in studio.iter_tasks(project.id, full=False)}
    assert all(set(t) == set(TASK_FIELDS.split(",")) for t in bare.values()), bare
    assert bare[annotated]["is_labeled"] and bare[annotated]["total_annotations"] == 1
    # only the version strings were added to the light page; the full one carries results
    after = page_bytes(project, **light)
    full = page_bytes(project, fields="all")
    added = sum(len(",".join((*OURS, FOREIGN))) + 4 for _ in tasks)
    assert after - before <= added, (before, after)
    assert full > after + 3 * 3 * 1000, (full, after)
    print(f"\n[e2e] 3 tasks, 3 versions: light page {after} bytes, fields=all {full} bytes")


def test_one_version_of_predictions_is_deleted_in_one_request(label_studio):
    names = sorted(label_studio.images.images)[3:5]
    project = create_project(label_studio, "s4al e2e: delete a version", names)
    tasks = sorted(project.image_tasks().items())
    studio = Studio(label_studio.url, label_studio.api_key)
    push_versions(studio, project, tasks, (*OURS, FOREIGN))
    counts = studio.model_versions(project.id)
    assert {v: counts[v] for v in (*OURS, FOREIGN)} == {v: len(tasks) for v in (*OURS, FOREIGN)}

    assert studio.delete_model_version(project.id, OURS[0]) == len(tasks)

    counts = studio.model_versions(project.id)
    assert OURS[0] not in counts and counts[OURS[1]] == counts[FOREIGN] == len(tasks)
    for task in studio.iter_tasks(project.id):
        assert task_model_versions(task) == {OURS[1], FOREIGN}
