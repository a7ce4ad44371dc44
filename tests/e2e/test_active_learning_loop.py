"""The whole loop as a Label Studio user meets it, against a real Label Studio 1.23 server,
the backend under gunicorn, a real RQ worker and Redis.

One project of ~20 CamVid images (local-files storage), in the order a team lives it:
connect the backend -> untrained predictions -> 4 annotations -> the 4th webhook trains
(cycle 1) -> new version, pre-labels with scores on every task, region tasks -> a task
imported later gets its pre-labels through /predict -> an annotator labels one region task
-> "Start training" (START_TRAINING) -> cycle 2 counts the region's pixels, and only those.
"""

from __future__ import annotations

import time

import numpy as np

from .conftest import IGNORE, IMAGE_SIZE, TINY_TRAINING
from .cycles import setup_version, training, wait_cycle
from .studio import REGION_NAME, create_project, decode_brush, prediction_mask, wait_for

WIDTH, HEIGHT = IMAGE_SIZE
SHAPE = (HEIGHT, WIDTH)
REGION = int(TINY_TRAINING["REGION_SIZE"])
MAX_REGIONS = int(TINY_TRAINING["REGIONS_PER_CYCLE"])
N_TRIGGER = int(TINY_TRAINING["TRAIN_AFTER_ANNOTATIONS"])


class Steps:
    """Prints each step with the time since the test began (shown with -s / on failure)."""

    def __init__(self):
        self.t0 = time.monotonic()

    def __call__(self, text: str) -> None:
        print(f"[e2e {time.monotonic() - self.t0:6.1f} s] {text}", flush=True)


def check_prediction(prediction: dict, classes: list[str], version: str) -> np.ndarray:
    """A prediction of `version` whose brush masks decode to the image's size, with a score
    in (0, 1]; returns its class mask."""
    assert prediction["model_version"] == version
    score = prediction.get("score")
    assert isinstance(score, float) and 0.0 < score <= 1.0, f"score {score!r}"
    brushes = [r for r in prediction["result"] if r["type"] == "brushlabels"]
    assert brushes, "a trained model's prediction has no brush mask"
    for result in brushes:
        assert (result["original_width"], result["original_height"]) == (WIDTH, HEIGHT)
        assert result["value"]["brushlabels"][0] in classes
        assert decode_brush(result).any(), "an empty brush mask"
        assert 0.0 <= result.get("score", 0.5) <= 1.0
    return prediction_mask(prediction["result"], classes, SHAPE)


def test_active_learning_loop(label_studio, backend_stack, camvid_images):
    step = Steps()
    images = camvid_images
    classes = images.classes
    names = sorted(images.images)
    held_back = names[-1]  # imported after the first cycle
    n_image_tasks = len(names)

    stack = backend_stack()
    project = create_project(label_studio, "s4al e2e: the loop", names, exclude=(held_back,))
    step(f"project {project.id}: {len(names) - 1} tasks from local storage")

    # -- connect the backend: Label Studio calls /health and /setup
    ml_id = project.connect(stack)
    wait_for(lambda: project.client.ml.get(id=ml_id).state == "CO", 30,
             "the ML backend to show as connected")
    assert setup_version(stack, project) == "untrained"

    # -- before any training: Label Studio asks /predict, the answer is the untrained one
    project.retrieve_predictions()
    tasks = project.image_tasks()
    for task in tasks.values():
        for prediction in task.get("predictions") or []:
            assert prediction["model_version"] == "untrained", prediction
            assert prediction["result"] == []
    step(f"untrained predictions: {sum(len(t.get('predictions') or []) for t in tasks.values())}"
         " stored, all empty")

    # -- an annotator submits 4 ground-truth masks; the 4th webhook queues cycle 1
    annotated = names[:N_TRIGGER]
    for i, name in enumerate(annotated[:-1], start=1):
        project.annotate(tasks[name]["id"], images.images[name].mask)
        wait_for(lambda i=i: training(stack, project).get("pending_annotations") == i, 30,
                 f"webhook {i} to be counted", interval=0.5, details=stack.logs)
    since = time.time()
    project.annotate(tasks[annotated[-1]]["id"], images.images[annotated[-1]].mask)
    step(f"{N_TRIGGER} annotations submitted; waiting for cycle 1")

    cycle1 = wait_cycle(stack, project, since)
    step(f"cycle 1: {cycle1.get('status')} in {cycle1.get('seconds')} s, version "
         f"{cycle1.get('version')}, timings {cycle1.get('timings')}")
    assert cycle1["status"] == "done", cycle1
    assert "annotation" in str(cycle1.get("reason")), cycle1.get("reason")
    assert cycle1["labelled_tasks"] == N_TRIGGER
    v1 = cycle1["version"]
    assert v1 and v1 != "untrained"
    assert setup_version(stack, project) == v1, "/setup must announce the new version"
    assert stack.status(project.id)["model_version"] == v1

    full_pixels = sum(images.images[n].labelled_pixels for n in annotated)
    assert cycle1["labelled_fraction"] == round(
        full_pixels / ((n_image_tasks - 1) * WIDTH * HEIGHT), 6)

    # -- every image task without a full annotation has a prediction of v1 (the annotated
    # ones need no pre-label): decodable masks of the image size, scores
    tasks = project.image_tasks()
    assert len(tasks) == n_image_tasks - 1
    for name, task in tasks.items():
        mine = [p for p in task.get("predictions") or [] if p["model_version"] == v1]
        assert len(mine) == (0 if name in annotated else 1), \
            f"{name}: predictions {task.get('predictions')}"
        if name in annotated:
            continue
        mask = check_prediction(mine[0], classes, v1)
        assert (mask != IGNORE).all(), "pre-labels cover every pixel"
    step(f"{len(tasks)} tasks carry {v1} pre-labels")

    # -- region tasks: real tasks, real regions, pre-labels only inside, the rectangle drawn
    regions = project.region_tasks()
    assert 1 <= len(regions) <= MAX_REGIONS, regions
    by_id = {t["id"]: t for t in tasks.values()}
    annotated_ids = {tasks[n]["id"] for n in annotated}
    for region in regions:
        data = region["data"]
        source = by_id.get(int(data["source_task"]))
        assert source is not None, f"region {data} points at no image task"
        assert source["id"] not in annotated_ids, "a fully annotated image was acquired"
        assert data["image"] == source["data"]["image"]
        x, y, w, h = (int(data[k]) for k in ("x", "y", "w", "h"))
        assert (w, h) == (REGION, REGION) and x >= 0 and y >= 0
        assert x + w <= WIDTH and y + h <= HEIGHT
        assert data["region_id"] == f"t{source['id']}-x{x}-y{y}-w{w}-h{h}"
        (prediction,) = region["predictions"]
        mask = check_prediction(prediction, classes, v1)
        inside = np.zeros(SHAPE, bool)
        inside[y:y + h, x:x + w] = True
        assert (mask[~inside] == IGNORE).all(), "region pre-labels leak outside the region"
        assert (mask[inside] != IGNORE).all()
        (rect,) = [r for r in prediction["result"] if r["from_name"] == REGION_NAME]
        value = rect["value"]
        assert abs(value["x"] - 100 * x / WIDTH) < 1e-6
        assert abs(value["y"] - 100 * y / HEIGHT) < 1e-6
        assert abs(value["width"] - 100 * w / WIDTH) < 1e-6
        assert abs(value["height"] - 100 * h / HEIGHT) < 1e-6
    assert len({r["data"]["region_id"] for r in regions}) == len(regions)
    step(f"{len(regions)} region tasks: {[r['data']['region_id'] for r in regions]}")

    # -- a task imported later (relative URL): Label Studio asks /predict for it, gets v1
    folder = project.storage_folder
    (new_id,) = project.client.projects.import_tasks(
        id=project.id, request=[{"data": {"image": f"/data/local-files/?d={folder}/{held_back}"}}],
        return_task_ids=True,
    ).task_ids
    project.retrieve_predictions([new_id])
    task = project.client.tasks.get(id=new_id).model_dump(mode="json", exclude_none=True)
    mine = [p for p in task.get("predictions") or [] if p["model_version"] == v1]
    assert len(mine) == 1, f"no {v1} prediction via /predict: {task.get('predictions')}\n" \
        f"{stack.logs()}"
    check_prediction(mine[0], classes, v1)
    step(f"task {new_id} imported later got {v1} pre-labels through /predict")

    # -- an annotator labels one region task: the whole image painted, only the region counts
    region = regions[0]
    data = region["data"]
    source_name = next(n for n, t in tasks.items() if t["id"] == int(data["source_task"]))
    truth = images.images[source_name].mask
    project.annotate(region["id"], truth)
    x, y, w, h = (int(data[k]) for k in ("x", "y", "w", "h"))
    region_pixels = int((truth[y:y + h, x:x + w] != IGNORE).sum())
    assert region_pixels < images.images[source_name].labelled_pixels
    wait_for(lambda: training(stack, project).get("pending_annotations") == 1, 30,
             "the region annotation's webhook to be counted", interval=0.5)

    # -- "Start training" in the project settings: START_TRAINING -> cycle 2
    since = time.time()
    project.client.ml.train(id=ml_id)
    cycle2 = wait_cycle(stack, project, since)
    step(f"cycle 2: {cycle2.get('status')} in {cycle2.get('seconds')} s, version "
         f"{cycle2.get('version')}, timings {cycle2.get('timings')}")
    assert cycle2["status"] == "done", cycle2
    assert "START_TRAINING" in str(cycle2.get("reason")), cycle2.get("reason")
    assert cycle2["version"] not in (v1, "untrained")
    assert cycle2["previous_version"] == v1
    assert cycle2["image_tasks"] == n_image_tasks
    assert cycle2["labelled_tasks"] == N_TRIGGER + 1
    expected = round((full_pixels + region_pixels) / (n_image_tasks * WIDTH * HEIGHT), 6)
    assert cycle2["labelled_fraction"] == expected, (
        f"labelled fraction {cycle2['labelled_fraction']} != {expected}: the region "
        f"annotation must count {region_pixels} pixels, not its whole image")
    assert setup_version(stack, project) == cycle2["version"]

    # no region pushed twice, none on labelled pixels
    regions = project.region_tasks()
    ids = [r["data"]["region_id"] for r in regions]
    assert len(ids) == len(set(ids)), ids
    for r in regions:
        d = r["data"]
        if d.get("cycle_version") == cycle2["version"]:
            assert int(d["source_task"]) not in annotated_ids
            if int(d["source_task"]) == int(data["source_task"]):
                rx, ry = int(d["x"]), int(d["y"])
                assert rx + REGION <= x or x + w <= rx or ry + REGION <= y or y + h <= ry, \
                    "a region over already labelled pixels was acquired"
    step(f"cycle 2 counted {region_pixels} region pixels; {len(regions)} region tasks in all")

    # -- the dashboard over the real Label Studio: the annotated region counts as done
    check_dashboard(stack, project, label_studio, regions, annotated_region=region["id"],
                    versions=(v1, cycle2["version"]))
    step("the dashboard shows both cycles, the done region and working region links")


def check_dashboard(stack, project, label_studio, regions: list[dict], annotated_region: int,
                    versions: tuple[str, str]) -> None:
    """GET /dashboard on the gunicorn backend: the project at its new version, region tasks
    open / done per cycle as Label Studio counts them, links and thumbnails of open ones."""
    import re

    import requests

    reply = requests.get(f"{stack.url}/dashboard", timeout=30)
    assert reply.status_code == 200, reply.text[:300]
    html = reply.text
    assert f'data-project="{project.id}"' in html
    assert f'class="chip version" data-version="{versions[1]}"' in html
    assert "2 cycle(s) had no holdout score" in html  # HOLDOUT_FRACTION=0: no curve points
    assert label_studio.api_key not in html
    first = [r for r in regions if r["data"]["cycle_version"] == versions[0]]
    assert annotated_region in {r["id"] for r in first}
    assert (f'data-version="{versions[0]}" data-open="{len(first) - 1}" data-done="1"'
            in html), re.findall(r"<tr data-version[^>]+>", html)
    links = re.findall(r'href="([^"]+)"[^>]*data-task="(\d+)"', html)
    assert links and annotated_region not in {int(t) for _, t in links}
    href, task = links[0]
    assert href == f"{label_studio.url}/projects/{project.id}/data?task={task}"
    thumb = requests.get(f"{stack.url}/dashboard/projects/{project.id}/regions/{task}.png",
                         timeout=30)
    assert thumb.status_code == 200 and thumb.content[:4] == b"\x89PNG", thumb.text[:300]
