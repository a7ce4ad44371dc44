"""What goes wrong in real deployments, against the real Label Studio server: the backend
down while people annotate, and a wrong API key."""

from __future__ import annotations

import secrets
import time

from .conftest import IMAGE_SIZE
from .cycles import training, wait_cycle
from .studio import create_project, wait_for

WIDTH, HEIGHT = IMAGE_SIZE


def test_backend_down_while_annotating_loses_nothing(label_studio, backend_stack,
                                                     camvid_images):
    images = camvid_images
    names = sorted(images.images)[:6]
    project = create_project(label_studio, "s4al e2e: backend down", names)
    stack = backend_stack()
    ml_id = project.connect(stack)
    tasks = project.image_tasks()

    # the backend and its worker go away; annotators keep working
    stack.stop()
    annotated = names[:2]
    for name in annotated:
        project.annotate(tasks[name]["id"], images.images[name].mask)
    tasks = project.image_tasks()
    for name in annotated:
        assert len(tasks[name]["annotations"]) == 1, "Label Studio lost an annotation"

    # back up: the webhooks were lost (nothing pending), yet the next cycle rereads all
    stack.start_web()
    stack.start_worker()
    assert training(stack, project)["pending_annotations"] == 0
    wait_for(lambda: project.client.ml.get(id=ml_id).state == "CO", 30,
             "Label Studio to see the backend connected again")
    since = time.time()
    project.client.ml.train(id=ml_id)
    cycle = wait_cycle(stack, project, since)
    assert cycle["status"] == "done", cycle
    assert cycle["labelled_tasks"] == len(annotated)
    pixels = sum(images.images[n].labelled_pixels for n in annotated)
    assert cycle["labelled_fraction"] == round(pixels / (len(names) * WIDTH * HEIGHT), 6)
    version = cycle["version"]
    tasks = project.image_tasks()
    assert all(any(p["model_version"] == version for p in t["predictions"])
               for name, t in tasks.items() if name not in annotated), \
        "pre-labels of the new version on every task without a full annotation"


def test_wrong_api_key_fails_the_job_with_a_clear_error(label_studio, backend_stack,
                                                        camvid_images):
    images = camvid_images
    names = sorted(images.images)[:4]
    project = create_project(label_studio, "s4al e2e: wrong key", names)
    wrong = secrets.token_hex(20)
    stack = backend_stack(LABEL_STUDIO_API_KEY=wrong)
    ml_id = project.connect(stack)  # /health and /setup need no key
    tasks = project.image_tasks()
    project.annotate(tasks[names[0]]["id"], images.images[names[0]].mask)

    since = time.time()
    project.client.ml.train(id=ml_id)
    last = wait_cycle(stack, project, since, timeout=180)
    assert last["status"] == "failed", last
    error = last["error"]
    print(f"[e2e] the job status says: {error}")
    assert "401" in error and "Label Studio" in error, error
    assert wrong not in error, "the key must never be echoed"
    assert last.get("will_retry") is True, "a refused cycle is retried with backoff"
    worker_log = stack.worker.log.read_text(errors="replace")
    assert "401" in worker_log and wrong not in worker_log
