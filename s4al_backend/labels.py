"""Label Studio label configs <-> class maps, class masks <-> Label Studio results.

The project's config is parsed with label_studio_sdk's label interface. What the backend
needs from it: an ``<Image>`` object and a ``<BrushLabels>`` control pointing at it (the
classes, in the config's order, and the names results carry). ``<PolygonLabels>`` on the
same image are read for annotations; a ``<Rectangle>`` / ``<RectangleLabels>`` control
named ``region`` (or else the only unlabelled ``<Rectangle>`` on the image) is reserved
for drawing acquisition regions.

Masks are int64 H x W class indices into ``LabelMap.classes``, 255 = unlabelled.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import cv2
import numpy as np
from label_studio_sdk.label_interface import LabelInterface

from model.ignore import IGNORE_INDEX

from . import rle

__all__ = [
    "IGNORE_INDEX",
    "REGION_CONTROL",
    "AnnotationError",
    "ClassMapping",
    "LabelConfigError",
    "LabelMap",
    "annotation_to_mask",
    "mask_to_results",
]

logger = logging.getLogger(__name__)

REGION_CONTROL = "region"


class LabelConfigError(ValueError):
    """The label config cannot drive this backend; the message says what is missing."""


class AnnotationError(ValueError):
    """An annotation result that cannot become a mask (wrong size, broken RLE, ...)."""


@dataclass(frozen=True)
class LabelMap:
    """What the backend reads from a label config.

    ``classes``: the BrushLabels' label values in config order (index = class index);
    ``from_name`` / ``to_name``: the BrushLabels control and the Image object;
    ``data_key``: the task data field holding the image URL (``$image`` -> ``image``);
    ``polygon_controls``: PolygonLabels control names on the same image;
    ``region_control``: the rectangle control reserved for regions, or None
    (``region_type`` is ``rectangle`` or ``rectanglelabels``).
    """

    classes: tuple[str, ...]
    from_name: str
    to_name: str
    data_key: str
    polygon_controls: tuple[str, ...] = ()
    region_control: str | None = None
    region_type: str | None = None
    region_labels: tuple[str, ...] = ()
    index: dict[str, int] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self):
        self.index.update({name: i for i, name in enumerate(self.classes)})

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @classmethod
    def from_config(cls, config: str) -> LabelMap:
        if not isinstance(config, str) or not config.strip():
            raise LabelConfigError("the label config is empty")
        try:
            interface = LabelInterface(config)
        except Exception as exc:  # the SDK raises several kinds for bad XML
            raise LabelConfigError(f"the label config does not parse: {exc}") from None

        images = {
            obj.name: obj for obj in interface.objects if obj.tag.lower() == "image"
        }
        brushes = [
            c
            for c in interface.controls
            if c.tag.lower() == "brushlabels" and any(t in images for t in c.to_name)
        ]
        if not images:
            raise LabelConfigError(
                "the label config has no <Image> object; this backend needs "
                '<Image name="image" value="$image"/> with a <BrushLabels> control on it'
            )
        if not brushes:
            raise LabelConfigError(
                "the label config has no <BrushLabels> control pointing at an <Image>; "
                f"found controls: {_describe(interface.controls) or 'none'}"
            )
        brush = brushes[0]
        if len(brushes) > 1:
            logger.warning(
                "label config has %d BrushLabels controls; using %r", len(brushes), brush.name
            )
        to_name = next(t for t in brush.to_name if t in images)
        classes = tuple(brush.labels)
        if not classes:
            raise LabelConfigError(f"the <BrushLabels name={brush.name!r}> control has no labels")
        if len(set(classes)) != len(classes):
            raise LabelConfigError(f"the <BrushLabels name={brush.name!r}> repeats a label")
        data_key = str(images[to_name].value or "").lstrip("$")
        if not data_key:
            raise LabelConfigError(f'the <Image name="{to_name}"> has no value="$field"')

        polygons = tuple(
            c.name
            for c in interface.controls
            if c.tag.lower() == "polygonlabels" and to_name in c.to_name
        )
        rects = [
            c
            for c in interface.controls
            if c.tag.lower() in ("rectangle", "rectanglelabels") and to_name in c.to_name
        ]
        region = next((c for c in rects if c.name == REGION_CONTROL), None)
        if region is None:
            plain = [c for c in rects if c.tag.lower() == "rectangle"]
            region = plain[0] if len(plain) == 1 else None
        return cls(
            classes=classes,
            from_name=brush.name,
            to_name=to_name,
            data_key=data_key,
            polygon_controls=polygons,
            region_control=region.name if region is not None else None,
            region_type=region.tag.lower() if region is not None else None,
            region_labels=tuple(getattr(region, "labels", None) or ()) if region else (),
        )

    def image_url(self, task: dict) -> str:
        """The task's image URL (raises KeyError naming the field when it is missing)."""
        data = task.get("data") if isinstance(task, dict) else None
        if not isinstance(data, dict) or self.data_key not in data:
            raise KeyError(f"task has no data.{self.data_key}")
        url = data[self.data_key]
        if not isinstance(url, str) or not url:
            raise KeyError(f"task data.{self.data_key} is not a URL")
        return url


@dataclass(frozen=True)
class ClassMapping:
    """How a model's output classes map onto a label config's classes, by name.

    ``to_config[j]`` is the config class index of model class j, or -1 when the config
    lacks it. ``missing``: config classes the model cannot predict; ``extra``: model
    classes the config no longer has (their pixels stay unlabelled)."""

    to_config: tuple[int, ...]
    missing: tuple[str, ...]
    extra: tuple[str, ...]

    @classmethod
    def between(cls, model_classes: Sequence[str], label_map: LabelMap) -> ClassMapping:
        to_config = tuple(label_map.index.get(name, -1) for name in model_classes)
        missing = tuple(c for c in label_map.classes if c not in set(model_classes))
        extra = tuple(c for c, i in zip(model_classes, to_config, strict=True) if i < 0)
        return cls(to_config, missing, extra)

    @property
    def overlap(self) -> int:
        return sum(1 for i in self.to_config if i >= 0)

    @property
    def identity(self) -> bool:
        return self.to_config == tuple(range(len(self.to_config))) and not self.missing

    def lookup(self) -> np.ndarray:
        """A table for ``table[model_class_index] -> config index`` (255 for extra)."""
        table = np.array(self.to_config, dtype=np.int64)
        table[table < 0] = IGNORE_INDEX
        return table


def mask_to_results(
    mask: np.ndarray,
    label_map: LabelMap,
    confidence: np.ndarray | None = None,
) -> list[dict]:
    """One ``brushlabels`` result per class present in ``mask`` (config class indices,
    255 = none). With ``confidence`` (float H x W, the predicted class's probability),
    each result carries ``score`` = that class's mean confidence over its pixels."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must be H x W, got shape {mask.shape}")
    height, width = mask.shape
    flat = mask.reshape(-1)
    present = np.bincount(flat[flat != IGNORE_INDEX].astype(np.int64),
                          minlength=label_map.num_classes)
    if present.size > label_map.num_classes:
        raise ValueError(f"mask holds class {present.size - 1}, the config has "
                         f"{label_map.num_classes} classes")
    sums = None
    if confidence is not None:
        confidence = np.asarray(confidence, dtype=np.float64)
        if confidence.shape != mask.shape:
            raise ValueError(f"confidence {confidence.shape} does not match mask {mask.shape}")
        valid = flat != IGNORE_INDEX
        sums = np.bincount(flat[valid].astype(np.int64), weights=confidence.reshape(-1)[valid],
                           minlength=label_map.num_classes)
    results = []
    for index in np.flatnonzero(present):
        result = {
            "id": uuid.uuid4().hex[:10],
            "from_name": label_map.from_name,
            "to_name": label_map.to_name,
            "type": "brushlabels",
            "original_width": int(width),
            "original_height": int(height),
            "image_rotation": 0,
            "value": {
                "format": "rle",
                "rle": rle.encode(mask == index),
                "brushlabels": [label_map.classes[index]],
            },
        }
        if sums is not None:
            result["score"] = round(float(sums[index] / present[index]), 4)
        results.append(result)
    return results


def annotation_to_mask(
    results: Iterable[dict],
    label_map: LabelMap,
    height: int | None = None,
    width: int | None = None,
    problems: list[str] | None = None,
) -> np.ndarray:
    """An annotation's (or prediction's) results -> int64 class mask H x W, 255 where
    nobody labelled. Brush RLE and polygons are read; later results paint over earlier
    ones, as Label Studio draws them. The size is ``height`` x ``width`` (the image's)
    or, when not given, the first result's ``original_height`` x ``original_width``.

    Results that cannot be used (unknown label, wrong mask size, broken RLE, other
    controls) are skipped with a logged reason, also appended to ``problems``; the rest
    still count. Raises ``AnnotationError`` only when no size can be known."""
    results = [r for r in (results or []) if isinstance(r, dict)]
    if height is None or width is None:
        for r in results:
            if r.get("original_height") and r.get("original_width"):
                height, width = int(r["original_height"]), int(r["original_width"])
                break
        else:
            raise AnnotationError("no result gives original_width/original_height")
    height, width = int(height), int(width)
    mask = np.full((height, width), IGNORE_INDEX, dtype=np.int64)

    def skip(reason: str, result: dict) -> None:
        message = f"result {result.get('id', '?')} ({result.get('from_name')}): {reason}"
        logger.warning("skipped annotation %s", message)
        if problems is not None:
            problems.append(message)

    for result in results:
        kind = str(result.get("type", "")).lower()
        value = result.get("value") or {}
        if kind == "brushlabels" and result.get("from_name") == label_map.from_name:
            labels = value.get("brushlabels") or []
        elif kind == "polygonlabels" and result.get("from_name") in label_map.polygon_controls:
            labels = value.get("polygonlabels") or []
        else:
            continue  # other controls (the region rectangle, choices, ...) are not masks
        if result.get("to_name") not in (None, label_map.to_name):
            skip(f"points at {result.get('to_name')!r}, not {label_map.to_name!r}", result)
            continue
        if len(labels) != 1:
            skip(f"needs exactly one label, has {labels!r}", result)
            continue
        index = label_map.index.get(labels[0])
        if index is None:
            skip(f"unknown label {labels[0]!r} (not in the config)", result)
            continue
        try:
            if kind == "brushlabels":
                region = _brush_region(result, value, height, width)
            else:
                region = _polygon_region(value, height, width)
        except (AnnotationError, rle.RLEError) as exc:
            skip(str(exc), result)
            continue
        mask[region] = index
    return mask


def _brush_region(result: dict, value: dict, height: int, width: int) -> np.ndarray:
    if value.get("format", "rle") != "rle" or "rle" not in value:
        raise AnnotationError("brush result without an RLE")
    r_height, r_width = result.get("original_height"), result.get("original_width")
    if (r_height, r_width) != (None, None) and (r_height, r_width) != (height, width):
        raise AnnotationError(
            f"mask size {r_width}x{r_height} does not match the image's {width}x{height}"
        )
    return rle.decode(value["rle"], height, width)


def _polygon_region(value: dict, height: int, width: int) -> np.ndarray:
    points = value.get("points")
    try:
        pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    except (TypeError, ValueError):
        raise AnnotationError("polygon points are not a list of [x, y] pairs") from None
    if len(pts) < 3 or not np.isfinite(pts).all():
        raise AnnotationError("a polygon needs at least 3 finite points")
    # Label Studio polygon points are percentages of the image size
    pixel = np.empty_like(pts)
    pixel[:, 0] = pts[:, 0] / 100.0 * width
    pixel[:, 1] = pts[:, 1] / 100.0 * height
    canvas = np.zeros((height, width), dtype=np.uint8)
    # fillPoly works on pixel corners; shift by half a pixel to sample pixel centres
    shift = 4
    scaled = np.round((pixel - 0.5) * (1 << shift)).astype(np.int32)
    cv2.fillPoly(canvas, [scaled], 1, lineType=cv2.LINE_8, shift=shift)
    return canvas.astype(bool)


def _describe(controls) -> str:
    return ", ".join(f"<{c.tag} name={c.name!r}>" for c in controls)
