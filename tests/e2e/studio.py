"""What an annotator and a project admin do in Label Studio, through label-studio-sdk:
create a project with the CamVid brush config, import images through a Local Storage,
connect the backend, annotate with ground-truth brush RLE, read tasks back.

Masks are encoded and decoded with label_studio_sdk.converter.brush (Label Studio's own
code), independent of the backend's encoder under test.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import parse_qs, urlsplit

import numpy as np
from label_studio_sdk.converter import brush

from .conftest import IGNORE, BackendStack, ImageSet, LabelStudioServer

FROM_NAME, TO_NAME, REGION_NAME = "tag", "image", "region"

# the SegNet CamVid palette, so pre-labels look like the dataset's own colour code
PALETTE = {
    "Sky": "#808080", "Building": "#800000", "Pole": "#C0C080", "Road": "#804080",
    "Pavement": "#3C28DE", "Tree": "#808000", "SignSymbol": "#C08080", "Fence": "#404080",
    "Car": "#400080", "Pedestrian": "#404000", "Bicyclist": "#0080C0",
}


def label_config(classes: list[str], region: bool = True) -> str:
    """The recommended config: one Image, one BrushLabels with the classes, and a plain
    Rectangle named `region` where the backend draws each acquired region."""
    labels = "\n".join(
        f'    <Label value="{c}" background="{PALETTE.get(c, "#FF00FF")}"/>' for c in classes
    )
    rect = f'\n  <Rectangle name="{REGION_NAME}" toName="{TO_NAME}" strokeWidth="2"/>' \
        if region else ""
    return (
        "<View>\n"
        f'  <Image name="{TO_NAME}" value="$image" zoom="true"/>\n'
        f'  <BrushLabels name="{FROM_NAME}" toName="{TO_NAME}">\n{labels}\n  </BrushLabels>'
        f"{rect}\n</View>"
    )


def wait_for(predicate: Callable[[], object], timeout: float, what: str,
             interval: float = 1.0, details: Callable[[], str] | None = None):
    """Poll until `predicate()` returns something truthy; return it. Fails with `what`
    (and `details()`, e.g. process logs) on timeout."""
    import pytest

    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            extra = f"\n{details()}" if details else ""
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}{extra}")
        time.sleep(interval)


def image_name(task: dict) -> str:
    """The file name behind a task's image URL (`.../data/local-files/?d=set0/x.png`)."""
    url = task["data"]["image"]
    path = parse_qs(urlsplit(url).query).get("d", [url])[0]
    return path.rsplit("/", 1)[-1]


@dataclass
class Project:
    id: int
    ls: LabelStudioServer
    images: ImageSet
    storage_folder: str

    @property
    def client(self):
        return self.ls.client()

    def tasks(self) -> list[dict]:
        """Every task with annotations and predictions, as plain dicts."""
        out = []
        for task in self.client.tasks.list(project=self.id, fields="all", page_size=100):
            out.append(task.model_dump(mode="json", exclude_none=True))
        return out

    def image_tasks(self) -> dict[str, dict]:
        """name -> task, for the image tasks (not region tasks)."""
        return {image_name(t): t for t in self.tasks() if "region_id" not in t["data"]}

    def region_tasks(self) -> list[dict]:
        return [t for t in self.tasks() if "region_id" in t["data"]]

    def annotate(self, task_id: int, mask: np.ndarray) -> int:
        """Submit an annotation painting `mask` (class indices, 255 = unpainted)."""
        annotation = self.client.annotations.create(
            id=task_id, result=brush_results(mask, self.images.classes), was_cancelled=False,
            ground_truth=False, lead_time=1.0,
        )
        return int(annotation.id)

    def connect(self, backend: BackendStack) -> int:
        """Settings > Model > Connect model: returns the ML backend id."""
        ml = self.client.ml.create(project=self.id, url=backend.url, title="s4al",
                                   is_interactive=False)
        return int(ml.id)

    def retrieve_predictions(self, task_ids: list[int] | None = None) -> None:
        """Data Manager > select tasks > Retrieve predictions: Label Studio calls /predict."""
        selected = {"all": True} if task_ids is None else {"all": False,
                                                           "included": list(task_ids)}
        self.client.actions.create(id="retrieve_tasks_predictions", project=self.id,
                                   selected_items=selected)


def create_project(ls: LabelStudioServer, title: str, names: list[str] | None = None,
                   exclude: tuple[str, ...] = (), region: bool = True) -> Project:
    """A project with the CamVid brush config whose tasks come from a Local Storage over a
    folder of the document root holding `names` (default: every image). Files named in
    `exclude` stay in the folder (served) but the storage does not import them."""
    client = ls.client()
    images = ls.images
    folder = images.folder(names)
    project = client.projects.create(title=title, label_config=label_config(images.classes,
                                                                            region))
    regex = r".*\.png"
    if exclude:
        regex = "(?!(?:" + "|".join(re.escape(n) for n in exclude) + ")$)" + regex
    storage = client.import_storage.local.create(
        project=project.id, path=str(folder), regex_filter=regex,
        use_blob_urls=True, title=f"{title} images",
    )
    client.import_storage.local.sync(id=storage.id)
    expected = len(names or images.images) - len(exclude)
    made = Project(int(project.id), ls, images, folder.name)
    wait_for(lambda: len(made.tasks()) >= expected, 60,
             f"{expected} tasks from the local storage sync of {folder}")
    return made


def brush_results(mask: np.ndarray, classes: list[str]) -> list[dict]:
    """One brushlabels result per class present, encoded by Label Studio's own SDK."""
    height, width = mask.shape
    out = []
    for index in np.unique(mask):
        if index == IGNORE:
            continue
        painted = ((mask == index) * 255).astype(np.uint8)
        out.append({
            "id": f"gt{int(index)}",
            "from_name": FROM_NAME,
            "to_name": TO_NAME,
            "type": "brushlabels",
            "original_width": int(width),
            "original_height": int(height),
            "image_rotation": 0,
            "value": {"format": "rle", "rle": brush.mask2rle(painted),
                      "brushlabels": [classes[int(index)]]},
        })
    return out


def decode_brush(result: dict) -> np.ndarray:
    """A brushlabels result -> bool H x W, decoded by Label Studio's own SDK."""
    height, width = int(result["original_height"]), int(result["original_width"])
    flat = brush.decode_rle(result["value"]["rle"])
    assert flat.size == height * width * 4, (
        f"RLE decodes to {flat.size} bytes, expected {height}x{width}x4")
    return flat.reshape(height, width, 4)[:, :, 3] > 0


def prediction_mask(result: list[dict], classes: list[str], shape) -> np.ndarray:
    """A prediction's brush results -> class mask (255 where no class painted)."""
    mask = np.full(shape, IGNORE, dtype=np.int64)
    for item in result:
        if item.get("type") != "brushlabels":
            continue
        painted = decode_brush(item)
        assert painted.shape == tuple(shape), f"mask {painted.shape} for an image {shape}"
        (label,) = item["value"]["brushlabels"]
        mask[painted] = classes.index(label)
    return mask
