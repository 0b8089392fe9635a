"""Detection data as COCO files (issue 29, part 3): an annotation file (or a folder holding one)
becomes (images, targets) batches whose boxes follow each image's resize and crop; the file is a
stranger's data (JSON only, every field checked, no image outside its folder); detection data
is fed as 0..1 pixels at each image's size unless a flag or config says otherwise; a detector
run through the CLI on it is scored in recall and mAP per mode, and fix verifies by them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from bncheck.cli import cli
from bncheck.config import DataSettings
from bncheck.errors import InputError
from bncheck.reading.data import kind_defaults, open_data
from bncheck.reading.data.coco import box_geometry, coco_file, read_annotations, transformed_target

HERE = Path(__file__).resolve().parent
DETECTOR = f"{HERE.parent / 'measuring' / 'test_detections.py'}:HeatDetector"


def settings(resize=None, crop=None, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0)) -> DataSettings:
    return DataSettings(path=None, resize=resize, crop=crop, mean=mean, std=std, channels="rgb", seed=0)


def write_coco(root: Path, images: dict[str, np.ndarray], boxes: dict[str, list], json_path: Path,
               extra: dict | None = None) -> None:
    """Images as PNG files under ``root`` and a COCO file listing them with ``boxes`` ([x, y, w, h, category])."""
    root.mkdir(parents=True, exist_ok=True)
    document = {"images": [], "annotations": [], "categories": [{"id": 1, "name": "square"}, {"id": 7, "name": "dot"}]}
    for index, (name, pixels) in enumerate(images.items()):
        Image.fromarray(pixels).save(root / name)
        document["images"].append({"id": index, "file_name": name, "width": pixels.shape[1], "height": pixels.shape[0]})
        for x, y, w, h, category in boxes.get(name, []):
            document["annotations"].append({"id": len(document["annotations"]), "image_id": index, "iscrowd": 0,
                                            "category_id": category, "bbox": [x, y, w, h]})
    document.update(extra or {})
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(document))


def gray(width: int, height: int, value: int = 40) -> np.ndarray:
    return np.full((height, width, 3), value, np.uint8)


@pytest.mark.parametrize("size", [(64, 48), (37, 101), (300, 200), (20, 20), (50, 51)])
@pytest.mark.parametrize("resize,crop", [(32, None), (None, 40), (50, 30), (256, 224), (40, 64)])
def test_boxes_move_with_their_image_as_torchvision_moves_its_pixels(size, resize, crop) -> None:
    import torchvision.transforms.functional as TF

    width, height = size
    box = (width * 0.25, height * 0.3, width * 0.5, height * 0.45)  # x, y, w, h
    pixels = np.zeros((height, width), np.uint8)
    pixels[round(box[1]):round(box[1] + box[3]), round(box[0]):round(box[0] + box[2])] = 255
    img = Image.fromarray(pixels)
    if resize is not None:
        img = TF.resize(img, resize, antialias=True)
    if crop is not None:
        img = TF.center_crop(img, crop)
    moved = np.asarray(img) >= 128
    cfg = settings(resize, crop)
    *_, out_w, out_h = box_geometry(size, cfg)
    assert (out_w, out_h) == img.size
    from bncheck.reading.data.coco import Annotated

    image = Annotated(Path("x.png"), size, ((round(box[0]), round(box[1]), round(box[0] + box[2]),
                                             round(box[1] + box[3])),), (1,))
    target = transformed_target(image, size, cfg)
    rows, cols = np.nonzero(moved)
    if not len(rows):  # the crop cut the whole box away
        assert len(target["boxes"]) == 0
        return
    expected = [cols.min(), rows.min(), cols.max() + 1, rows.max() + 1]
    assert target["boxes"].shape == (1, 4) and target["labels"].tolist() == [1]
    assert target["boxes"][0].tolist() == pytest.approx(expected, abs=1.01)


def test_a_coco_file_reads_boxes_as_xyxy_and_leaves_out_what_coco_ignores(tmp_path) -> None:
    images = {"a.png": gray(32, 24), "b.png": gray(32, 24), "c.png": gray(32, 24)}
    write_coco(tmp_path, {k: v for k, v in images.items() if k != "c.png"},
               {"a.png": [(2, 3, 10, 5, 1), (0, 0, 0, 4, 1)], "b.png": [(1, 1, 4, 4, 7)]}, tmp_path / "ann.json")
    document = json.loads((tmp_path / "ann.json").read_text())
    document["images"].append({"id": 9, "file_name": "c.png", "width": 32, "height": 24})  # not on disk
    document["annotations"] += [{"id": 50, "image_id": 1, "category_id": 1, "bbox": [0, 0, 30, 20], "iscrowd": 1},
                                {"id": 51, "image_id": 1234, "category_id": 1, "bbox": [0, 0, 3, 3]}]
    (tmp_path / "ann.json").write_text(json.dumps(document))
    found = read_annotations(tmp_path / "ann.json")
    assert found.root == tmp_path and found.missing == 1 and found.crowd == 1 and found.empty == 1
    assert found.orphans == 1 and found.boxes == 2 and found.categories == 2
    by_name = {image.path.name: image for image in found.images}
    assert by_name["a.png"].boxes == ((2.0, 3.0, 12.0, 8.0),) and by_name["a.png"].labels == (1,)
    assert by_name["b.png"].labels == (7,)  # the file's category id, as it is

    source = open_data(tmp_path / "ann.json", settings(), batch_size=2, num_batches=None)
    (batch,) = list(source.batches())
    pictures, targets = batch
    assert isinstance(pictures, list) and [tuple(p.shape) for p in pictures] == [(3, 24, 32)] * 2
    assert float(pictures[0].max()) == pytest.approx(40 / 255)  # 0..1 pixels, as given
    assert sorted(t["labels"].tolist() for t in targets) == [[1], [7]]
    notes = " ".join(source.notes)
    assert "2 images with 2 boxes of 2 categories" in notes and "1 images ann.json annotates are not in" in notes
    assert "1 crowd annotations" in notes and "1 boxes of zero width or height" in notes
    assert "1 annotations of images the file does not list" in notes


@pytest.mark.parametrize("layout", ["roboflow", "coco", "images-and-annotations", "cvat", "label-studio",
                                    "windows-names"])
def test_the_usual_layouts_are_found(tmp_path, layout) -> None:
    pictures = {f"{i}.png": gray(16, 16, 10 * i) for i in range(4)}
    if layout == "roboflow":  # the images and _annotations.coco.json in one folder
        write_coco(tmp_path / "valid", pictures, {}, tmp_path / "valid" / "_annotations.coco.json")
        data, images = tmp_path / "valid", tmp_path / "valid"
    elif layout == "coco":  # annotations/instances_val2017.json beside val2017/
        write_coco(tmp_path / "val2017", pictures, {}, tmp_path / "annotations" / "instances_val2017.json")
        data, images = tmp_path / "annotations" / "instances_val2017.json", tmp_path / "val2017"
    elif layout == "cvat":  # annotations/instances_default.json beside images/
        write_coco(tmp_path / "images", pictures, {}, tmp_path / "annotations" / "instances_default.json")
        data, images = tmp_path / "annotations" / "instances_default.json", tmp_path / "images"
    elif layout == "label-studio":  # result.json naming images/NAME, beside images/
        write_coco(tmp_path / "images", pictures, {}, tmp_path / "result.json")
        document = json.loads((tmp_path / "result.json").read_text())
        for entry in document["images"]:
            entry["file_name"] = "images/" + entry["file_name"]
        (tmp_path / "result.json").write_text(json.dumps(document))
        data, images = tmp_path / "result.json", tmp_path
    elif layout == "windows-names":  # file names written on Windows
        write_coco(tmp_path / "data" / "images", pictures, {}, tmp_path / "data" / "ann.json")
        document = json.loads((tmp_path / "data" / "ann.json").read_text())
        for entry in document["images"]:
            entry["file_name"] = "images\\" + entry["file_name"]
        (tmp_path / "data" / "ann.json").write_text(json.dumps(document))
        data, images = tmp_path / "data" / "ann.json", tmp_path / "data"
    else:  # images/ + annotations/instances.json: detection, not a segmentation folder's masks
        write_coco(tmp_path / "images", pictures, {}, tmp_path / "annotations" / "instances.json")
        data, images = tmp_path, tmp_path / "images"
    if data.is_dir():
        assert coco_file(data) is not None
    assert kind_defaults(str(data))["mean"] == (0.0, 0.0, 0.0)
    source = open_data(data, settings(), batch_size=2, num_batches=None)
    assert f"images from {images}" in " ".join(source.notes)
    assert sum(len(batch[0]) for batch in source.batches()) == 4


def test_other_folders_and_files_are_not_detection_data(tmp_path) -> None:
    (tmp_path / "cats").mkdir()
    Image.fromarray(gray(8, 8)).save(tmp_path / "cats" / "0.png")
    (tmp_path / "labels.json").write_text(json.dumps({"cats": 0}))  # some other JSON beside the images
    assert coco_file(tmp_path) is None and kind_defaults(str(tmp_path)) == {}
    assert kind_defaults("module.py:batches") == {} and kind_defaults(str(tmp_path / "missing")) == {}


def test_a_masks_folder_with_a_json_beside_the_masks_stays_segmentation(tmp_path) -> None:
    (tmp_path / "images").mkdir()
    (tmp_path / "annotations").mkdir()
    for i in range(4):
        Image.fromarray(gray(8, 8)).save(tmp_path / "images" / f"{i}.png")
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "annotations" / f"{i}.png")
    (tmp_path / "annotations" / "panoptic.json").write_text(json.dumps({"images": [], "annotations": []}))
    assert coco_file(tmp_path) is None and kind_defaults(str(tmp_path)) == {}
    source = open_data(tmp_path, settings(), batch_size=2, num_batches=None)
    assert "masks are labels" in " ".join(source.notes)


def test_two_annotation_files_in_a_folder_is_an_error_naming_both(tmp_path) -> None:
    write_coco(tmp_path / "images", {"0.png": gray(8, 8)}, {}, tmp_path / "annotations" / "instances_train.json")
    write_coco(tmp_path / "images", {"0.png": gray(8, 8)}, {}, tmp_path / "annotations" / "instances_val.json")
    with pytest.raises(InputError, match=r"holds 2 COCO annotation files \(annotations/instances_train.json, "
                                         r"annotations/instances_val.json\); pass the one to use"):
        coco_file(tmp_path)


@pytest.mark.parametrize("name", ["../secret.png", "/etc/passwd", "a/../../b.png", "C:\\x.png", "..\\x.png"])
def test_an_image_name_outside_the_folder_is_refused(tmp_path, name) -> None:
    (tmp_path / "ann.json").write_text(json.dumps({"images": [{"id": 1, "file_name": name}], "annotations": []}))
    with pytest.raises(InputError, match="outside the image folder"):
        read_annotations(tmp_path / "ann.json")


@pytest.mark.parametrize("text,message", [
    ("{not json", "is not valid JSON"),
    ("[1, 2]", "is not a COCO annotation file"),
    ('{"images": [{"id": 1, "file_name": "a.png"}], "annotations": [{"image_id": 1, "category_id": 1, '
     '"bbox": [0, 0, "w", 3]}]}', r"annotations\[0\] has bbox"),
    ('{"images": [{"id": 1, "file_name": "a.png"}], "annotations": [{"image_id": 1, "category_id": "cat", '
     '"bbox": [0, 0, 2, 3]}]}', "category ids are integers"),
    ('{"images": [{"file_name": "a.png"}], "annotations": []}', r"images\[0\] has no id"),
    ('{"images": [], "annotations": []}', "lists no images"),
    ('{"images": [{"id": 1, "file_name": "gone.png"}], "annotations": []}', "none of the 1 images"),
    ("[" * 100_000 + "]" * 100_000, "is not valid JSON|is not a COCO"),
])
def test_a_bad_annotation_file_is_one_input_error(tmp_path, text, message) -> None:
    (tmp_path / "ann.json").write_text(text)
    with pytest.raises(InputError, match=message):
        read_annotations(tmp_path / "ann.json")


def test_photos_of_different_sizes_come_as_a_list(tmp_path) -> None:
    write_coco(tmp_path, {"a.png": gray(32, 24), "b.png": gray(20, 30)}, {}, tmp_path / "ann.json")
    (batch,) = list(open_data(tmp_path / "ann.json", settings(), batch_size=2, num_batches=None).batches())
    assert isinstance(batch[0], list) and sorted(tuple(p.shape) for p in batch[0]) == [(3, 24, 32), (3, 30, 20)]


def test_an_image_whose_size_is_not_the_annotated_one_is_skipped_with_the_reason(tmp_path) -> None:
    write_coco(tmp_path, {f"{i}.png": gray(16, 12) for i in range(3)}, {}, tmp_path / "ann.json")
    Image.fromarray(gray(12, 16)).save(tmp_path / "1.png")  # rotated after annotating
    source = open_data(tmp_path / "ann.json", settings(), batch_size=2, num_batches=None)
    assert sum(len(batch[0]) for batch in source.batches()) == 2
    assert len(source.skipped) == 1 and "annotated as 16x12 but the file is 12x16" in source.skipped[0]


def detection_set(root: Path, level: float) -> Path:
    """48 scenes of the toy detector's kind as PNG files with a COCO file (the boxes it should find)."""
    from test_detections import scenes

    images, targets = scenes(48, 1, level)
    pixels = {f"{i:03d}.png": (x.permute(1, 2, 0).clamp(0, 1) * 255).round().byte().numpy()
              for i, x in enumerate(images)}
    boxes = {f"{i:03d}.png": [(b[0], b[1], b[2] - b[0], b[3] - b[1], 1) for b in t["boxes"].tolist()]
             for i, t in enumerate(targets)}
    write_coco(root / "images", pixels, boxes, root / "annotations" / "instances.json")
    return root


@pytest.fixture(scope="module")
def detector(tmp_path_factory) -> Path:
    from test_detections import calibrated

    path = tmp_path_factory.mktemp("detector") / "detector.pt"
    torch.save(calibrated().state_dict(), path)
    return path


def test_a_detector_on_its_own_coco_data_passes_and_on_darker_images_fails_by_recall(tmp_path, detector) -> None:
    common = ["--arch", DETECTOR, "--batch-size", "8", "--num-batches", "6", "--json", "-"]
    own = CliRunner().invoke(cli, ["run", str(detector), "--data", str(detection_set(tmp_path / "own", 1.0)), *common])
    assert own.exit_code == 0, own.output
    document = json.loads(own.stdout)
    out = document["output"]
    assert out["kind"] == "detection" and out["labeled"] == 48 and out["objects"] == 94
    assert out["train_accuracy"] == 1.0 and out["eval_accuracy"] == 1.0  # recall of the target boxes
    assert "no resize (detection data), no crop (detection data)" in document["data"]["preprocessing"]
    assert "mean [0, 0, 0] (detection data) std [1, 1, 1] (detection data)" in document["data"]["preprocessing"]

    dark = detection_set(tmp_path / "dark", 0.5) / "annotations" / "instances.json"
    run = CliRunner().invoke(cli, ["run", str(detector), "--data", str(dark), *common])
    assert run.exit_code == 1, run.output
    document = json.loads(run.stdout)
    assert document["output"]["eval_accuracy"] == 0.0 and document["output"]["train_accuracy"] == 1.0
    assert any(f["code"] == "accuracy-gap" and "target boxes" in f["message"] for f in document["findings"])

    fixed = tmp_path / "fixed.pt"
    result = CliRunner().invoke(cli, ["fix", str(detector), "--arch", DETECTOR, "--data", str(dark), "--batch-size",
                                      "8", "--num-batches", "6", "--out", str(fixed), "--json", "-"])
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert document["outcome"] == "written" and document["after"]["output"]["eval_accuracy"] == 1.0
    assert document["held_out"]["after"] > document["held_out"]["before"]


def test_a_flag_still_sets_detection_preprocessing(tmp_path, detector) -> None:
    data = detection_set(tmp_path / "own", 1.0)
    result = CliRunner().invoke(cli, ["run", str(detector), "--arch", DETECTOR, "--data", str(data), "--batch-size",
                                      "8", "--num-batches", "1", "--resize", "32", "--json", "-"])
    document = json.loads(result.stdout)
    assert "resize shorter side to 32 (flag), no crop (detection data)" in document["data"]["preprocessing"]
    assert document["data"]["input_shape"] == [3, 32, 32]
    assert document["output"]["kind"] == "detection" and document["output"]["objects"] > 0


def test_a_broken_annotation_file_through_a_real_process_is_one_line_and_exit_3(tmp_path) -> None:
    (tmp_path / "instances.json").write_text('{"images": [{"id": 1, "file_name": "../x.png"}], "annotations": []}')
    done = subprocess.run([sys.executable, "-m", "bncheck", "run", "--arch", "torchvision:resnet18", "--data",
                           str(tmp_path / "instances.json")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 3, done.stderr
    assert "Traceback" not in done.stderr
    assert "names '../x.png', outside the image folder" in done.stderr


def test_a_classifier_given_detection_data_is_told_what_it_got(tmp_path) -> None:
    write_coco(tmp_path / "images", {f"{i}.png": gray(40 + 4 * i, 36) for i in range(4)}, {},
               tmp_path / "annotations" / "instances.json")
    result = CliRunner().invoke(cli, ["run", "--arch", "torchvision:resnet18", "--data", str(tmp_path),
                                      "--batch-size", "2", "--num-batches", "1"])
    assert result.exit_code == 3 and "Traceback" not in result.output
    assert "the model got a list of images, as detectors take them" in result.output
    assert "for a classifier pass a folder of images" in result.output


def test_category_ids_become_labels_as_they_are_or_renumbered_by_hand() -> None:
    from bncheck.reading.data.coco import label_map

    document = {"categories": [{"id": 90, "name": "toothbrush"}, {"id": 1, "name": "person"}, {"id": 3}]}
    assert label_map(document, {1, 3}, "category-id") == {1: 1, 3: 3, 90: 90}
    assert label_map(document, {1, 3}, "index") == {1: 0, 3: 1, 90: 2}  # sorted by id, as ultralytics numbers them
    assert label_map(document, {1, 3}, "index+1") == {1: 1, 3: 2, 90: 3}  # 0 is the background
    assert label_map({}, {7, 5}, "index") == {5: 0, 7: 1}  # no categories listed: those the boxes use


def test_box_labels_renumber_a_coco_files_targets_for_the_model(tmp_path, detector) -> None:
    data = detection_set(tmp_path / "own", 1.0)
    ann = data / "annotations" / "instances.json"
    document = json.loads(ann.read_text())
    for entry in document["annotations"]:
        entry["category_id"] = 7  # the detector's class 1 exported as category 7
    document["categories"] = [{"id": 7, "name": "square"}]
    ann.write_text(json.dumps(document))
    common = ["run", str(detector), "--arch", DETECTOR, "--data", str(data), "--batch-size", "8", "--num-batches",
              "2", "--json", "-"]
    as_is = CliRunner().invoke(cli, common)
    assert json.loads(as_is.stdout)["output"]["train_accuracy"] == 0.0
    table = CliRunner().invoke(cli, common[:-2])
    text = " ".join(table.stdout.split())  # the table wraps long lines
    assert "under other labels" in text and "--box-labels index" in text
    renumbered = CliRunner().invoke(cli, [*common, "--box-labels", "index+1"])
    assert renumbered.exit_code == 0, renumbered.output
    assert json.loads(renumbered.stdout)["output"]["train_accuracy"] == 1.0
    config = tmp_path / "c.yaml"
    config.write_text("data:\n  box_labels: zero-based\n")
    bad = CliRunner().invoke(cli, [*common, "--config", str(config)])
    assert bad.exit_code == 2 and "data.box_labels' must be one of category-id, index, index+1" in bad.output
