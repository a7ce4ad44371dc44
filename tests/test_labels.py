"""Label configs -> LabelMap; masks <-> Label Studio results; class maps by name."""

import cv2
import numpy as np
import pytest
from label_studio_sdk.label_interface import LabelInterface

from s4al_backend import rle
from s4al_backend.labels import (
    IGNORE_INDEX,
    ClassMapping,
    LabelConfigError,
    LabelMap,
    annotation_to_mask,
    mask_to_results,
)
from tests.service_helpers import CAMVID_CLASSES, brush_config


def test_from_config_reads_classes_names_and_region_control():
    lm = LabelMap.from_config(brush_config(polygons=["Road", "Car", "Truck"]))
    assert lm.classes == tuple(CAMVID_CLASSES)
    assert (lm.from_name, lm.to_name, lm.data_key) == ("tag", "image", "image")
    assert lm.polygon_controls == ("poly",)
    assert (lm.region_control, lm.region_type) == ("region", "rectangle")
    assert lm.index["Road"] == 3 and lm.num_classes == 11


def test_region_control_variants():
    config = (
        '<View><Image name="img" value="$url"/>'
        '<BrushLabels name="brush" toName="img"><Label value="A"/><Label value="B"/></BrushLabels>'
        '<RectangleLabels name="boxes" toName="img"><Label value="A"/></RectangleLabels>'
        '<Rectangle name="only" toName="img"/></View>'
    )
    lm = LabelMap.from_config(config)
    assert (lm.data_key, lm.to_name, lm.from_name) == ("url", "img", "brush")
    assert lm.region_control == "only"  # the one unlabelled rectangle
    named = config.replace('name="boxes"', 'name="region"')
    lm = LabelMap.from_config(named)
    assert (lm.region_control, lm.region_type) == ("region", "rectanglelabels")
    assert lm.region_labels == ("A",)
    assert LabelMap.from_config(brush_config(region=False)).region_control is None


@pytest.mark.parametrize("config,fragment", [
    ("", "empty"),
    ("<View><Image name='x'", "does not parse"),
    ('<View><Text name="t" value="$text"/></View>', "no <Image>"),
    ('<View><Image name="image" value="$image"/><PolygonLabels name="p" toName="image">'
     '<Label value="A"/></PolygonLabels></View>', "no <BrushLabels>"),
    ('<View><Image name="image" value="$image"/><BrushLabels name="b" toName="image">'
     '</BrushLabels></View>', "has no labels"),
])
def test_unusable_configs_say_what_is_missing(config, fragment):
    with pytest.raises(LabelConfigError, match=fragment):
        LabelMap.from_config(config)


def test_image_url():
    lm = LabelMap.from_config(brush_config())
    url = "/data/upload/1/a.png"
    assert lm.image_url({"id": 1, "data": {"image": url}}) == url
    with pytest.raises(KeyError, match="data.image"):
        lm.image_url({"id": 1, "data": {"img": "x"}})
    with pytest.raises(KeyError):
        lm.image_url({"id": 1, "data": {"image": 5}})


def test_mask_to_results_one_per_class_with_scores_and_valid_for_label_studio():
    lm = LabelMap.from_config(brush_config())
    mask = np.full((7, 9), IGNORE_INDEX, dtype=np.int64)
    mask[:3] = 3  # Road
    mask[3:, :4] = 8  # Car
    confidence = np.zeros((7, 9), np.float32)
    confidence[:3] = 0.9
    confidence[3:, :4] = 0.5
    results = mask_to_results(mask, lm, confidence)
    assert [r["value"]["brushlabels"] for r in results] == [["Road"], ["Car"]]
    for r in results:
        assert (r["type"], r["from_name"], r["to_name"]) == ("brushlabels", "tag", "image")
        assert (r["original_width"], r["original_height"]) == (9, 7)
        assert r["value"]["format"] == "rle"
    assert results[0]["score"] == pytest.approx(0.9) and results[1]["score"] == pytest.approx(0.5)
    np.testing.assert_array_equal(rle.decode(results[1]["value"]["rle"], 7, 9), mask == 8)
    interface = LabelInterface(brush_config())
    prediction = {"result": results, "score": 0.7}
    assert interface.validate_prediction(prediction, return_errors=True) == []


def test_mask_to_results_refuses_out_of_range_classes():
    lm = LabelMap.from_config(brush_config(["A", "B"]))
    with pytest.raises(ValueError, match="class 5"):
        mask_to_results(np.full((2, 2), 5), lm)
    with pytest.raises(ValueError):
        mask_to_results(np.zeros((2, 2)), lm, np.zeros((3, 3)))


def test_round_trip_brush_annotation():
    lm = LabelMap.from_config(brush_config())
    rng = np.random.default_rng(0)
    mask = rng.integers(0, 11, size=(30, 41))
    mask[rng.random(mask.shape) < 0.2] = IGNORE_INDEX
    results = mask_to_results(mask, lm)
    np.testing.assert_array_equal(annotation_to_mask(results, lm), mask)
    np.testing.assert_array_equal(annotation_to_mask(results, lm, 30, 41), mask)


def test_real_camvid_mask_round_trip(camvid_root):
    lm = LabelMap.from_config(brush_config())
    path = sorted((camvid_root / "trainannot").glob("*.png"))[0]
    labels = cv2.imread(str(path), cv2.IMREAD_UNCHANGED).astype(np.int64)
    labels[labels == 11] = IGNORE_INDEX  # CamVid's "Unlabelled"
    back = annotation_to_mask(mask_to_results(labels, lm), lm)
    np.testing.assert_array_equal(back, labels)


def test_polygons_are_rasterised():
    lm = LabelMap.from_config(brush_config(polygons=["Road", "Car"]))
    results = [{
        "from_name": "poly", "to_name": "image", "type": "polygonlabels",
        "original_width": 100, "original_height": 50,
        "value": {"points": [[10, 20], [60, 20], [60, 80], [10, 80]], "polygonlabels": ["Car"]},
    }]
    mask = annotation_to_mask(results, lm, 50, 100)
    car = mask == lm.index["Car"]
    # x 10..60 % of 100 px, y 20..80 % of 50 px: 50 x 30 px, give or take the edge pixels
    assert car[10:40, 10:60].all()
    assert 50 * 30 <= car.sum() <= 51 * 31
    assert not car[:9].any() and not car[:, :9].any() and not car[42:].any()
    assert (mask[~car] == IGNORE_INDEX).all()


def test_bad_results_are_skipped_and_the_rest_count():
    lm = LabelMap.from_config(brush_config(polygons=["Road"]))
    good = mask_to_results(np.full((4, 6), 3), lm)[0]  # Road everywhere
    wrong_size = {**mask_to_results(np.full((5, 6), 8), lm)[0], "id": "w"}
    unknown = {**good, "id": "u", "value": {**good["value"], "brushlabels": ["Spaceship"]}}
    broken = {**good, "id": "b", "value": {**good["value"], "rle": [1, 2, 3]}}
    two_labels = {**good, "id": "t", "value": {**good["value"], "brushlabels": ["Road", "Car"]}}
    polygon_few_points = {"from_name": "poly", "to_name": "image", "type": "polygonlabels",
                          "id": "p", "value": {"points": [[1, 1]], "polygonlabels": ["Road"]}}
    other = {"from_name": "region", "to_name": "image", "type": "rectangle",
             "value": {"x": 0, "y": 0, "width": 50, "height": 50}}
    problems = []
    mask = annotation_to_mask([good, wrong_size, unknown, broken, two_labels,
                               polygon_few_points, other], lm, 4, 6, problems)
    assert (mask == 3).all()
    text = "\n".join(problems)
    assert len(problems) == 5
    assert "6x5 does not match the image's 6x4" in text
    assert "unknown label 'Spaceship'" in text
    assert "RLE" in text and "exactly one label" in text and "3 finite points" in text


def test_later_results_paint_over_earlier():
    lm = LabelMap.from_config(brush_config(["A", "B"]))
    a = mask_to_results(np.zeros((3, 3), np.int64), lm)
    b_mask = np.full((3, 3), IGNORE_INDEX)
    b_mask[1] = 1
    b = mask_to_results(b_mask, lm)
    mask = annotation_to_mask(a + b, lm)
    assert (mask[1] == 1).all() and (mask[[0, 2]] == 0).all()


def test_annotation_without_size_needs_one():
    lm = LabelMap.from_config(brush_config())
    from s4al_backend.labels import AnnotationError

    with pytest.raises(AnnotationError):
        annotation_to_mask([], lm)
    assert (annotation_to_mask([], lm, 2, 3) == IGNORE_INDEX).all()


def test_class_mapping_by_name():
    lm = LabelMap.from_config(brush_config(["Road", "Sky", "Person"]))
    same = ClassMapping.between(["Road", "Sky", "Person"], lm)
    assert same.identity and same.overlap == 3
    shuffled = ClassMapping.between(["Sky", "Car", "Road"], lm)
    assert shuffled.to_config == (1, -1, 0)
    assert shuffled.missing == ("Person",) and shuffled.extra == ("Car",)
    assert shuffled.lookup().tolist() == [1, IGNORE_INDEX, 0]
    assert not shuffled.identity
    assert ClassMapping.between(["Cat", "Dog"], lm).overlap == 0
