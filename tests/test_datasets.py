"""Dataset adapters, each run on a miniature copy of its published layout written by the test."""

import json
import math
import os
import re

import h5py
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import scipy.io
import torch
from PIL import Image

from skp_ray.datasets import DATASETS, MANIFEST_SCHEMA, build_manifest, read_manifest, write_manifest
from skp_ray.datasets.manifest import DATASET_METADATA_KEY, manifest_table
from skp_ray.images import list_sources
from skp_ray.randomness import keyed_generator
from skp_ray.samples import write_sample_images


def save_image(path, width, height, colour=(90, 120, 150)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", (width, height), colour).save(path)


def write_text(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


def column(table, name):
    return table.column(name).to_pylist()


def row_of(table, key):
    return table.slice(column(table, "key").index(key), 1).to_pylist()[0]


def dataset_of(table):
    return table.schema.metadata[DATASET_METADATA_KEY].decode()


# ---------------------------------------------------------------- CelebA

CELEBA_POINTS = {  # image number -> 5 (x, y) pixel landmarks
    1: [(10, 12), (30, 12), (20, 25), (12, 35), (28, 35)],
    2: [(11, 13), (31, 13), (21, 26), (13, 36), (29, 36)],
    3: [(8, 10), (32, 10), (20, 20), (10, 40), (30, 40)],
    4: [(9, 11), (33, 11), (21, 21), (11, 41), (31, 41)],
}


def landmark_lines(names_on_lines=None):
    names_on_lines = names_on_lines or {}
    lines = [str(len(CELEBA_POINTS)), "lefteye_x lefteye_y righteye_x righteye_y nose_x nose_y ..."]
    for number, points in CELEBA_POINTS.items():
        name = names_on_lines.get(number, f"{number:06d}.jpg")
        lines.append(name + " " + " ".join(f"{x} {y}" for x, y in points))
    return lines


def make_celeba(root, wild):
    names_on_lines = {3: "999999.jpg"}  # a disagreeing name: rows still map by line order
    anno = "list_landmarks_celeba.txt" if wild else "list_landmarks_align_celeba.txt"
    write_text(root / "Anno" / anno, "\n".join(landmark_lines(names_on_lines)) + "\n")
    write_text(root / "MAFL" / "training.txt", "000001.jpg\n000002.jpg\n000003.jpg\n")
    write_text(root / "MAFL" / "testing.txt", "000004.jpg\n")
    for number in CELEBA_POINTS:
        if wild:
            save_image(str(root / "Img" / "img_celeba" / f"{number:06d}.jpg"), 40, 50)
        else:
            save_image(str(root / "Img" / "img_align_celeba_png" / f"{number:06d}.png"), 40, 50)
    if wild:
        # image 40x50 = 2000 px; 0.3 of it is 600: boxes of images 2 (train) and 4 (test) are too small
        boxes = {1: (0, 0, 30, 30), 2: (0, 0, 20, 29), 3: (5, 5, 25, 24), 4: (1, 1, 10, 10)}
        lines = ["4", "image_id x_1 y_1 width height"]
        lines += [f"{n:06d}.jpg {x} {y} {w} {h}" for n, (x, y, w, h) in boxes.items()]
        write_text(root / "Anno" / "list_bbox_celeba.txt", "\n".join(lines) + "\n")


def expected_celeba_landmarks(number):
    return [[x / 40, y / 50] for x, y in CELEBA_POINTS[number]]


def test_celeba_aligned_maps_rows_by_line_order(tmp_path):
    make_celeba(tmp_path, wild=False)
    table = build_manifest("celeba_aligned", str(tmp_path))
    assert table.schema.equals(MANIFEST_SCHEMA)
    assert dataset_of(table) == "celeba_aligned"
    assert column(table, "key") == ["000001.jpg", "000002.jpg", "000003.jpg", "000004.jpg"]
    assert column(table, "split") == ["train", "train", "train", "test"]
    row = row_of(table, "000003.jpg")
    assert row["uri"] == os.path.abspath(tmp_path / "Img" / "img_align_celeba_png" / "000003.png")
    assert np.asarray(row["landmarks_xy"]) == pytest.approx(np.array(expected_celeba_landmarks(3)))
    assert row["visible"] == [True] * 5
    assert row["crop_box"] is None and row["mask_uri"] is None


def test_celeba_wild_drops_small_boxes_in_both_splits(tmp_path):
    make_celeba(tmp_path, wild=True)
    table = build_manifest("celeba_wild", str(tmp_path))
    assert column(table, "key") == ["000001.jpg", "000003.jpg"]
    assert column(table, "split") == ["train", "train"]
    row = row_of(table, "000001.jpg")
    assert row["uri"] == os.path.abspath(tmp_path / "Img" / "img_celeba" / "000001.jpg")
    assert np.asarray(row["landmarks_xy"]) == pytest.approx(np.array(expected_celeba_landmarks(1)))


@pytest.mark.parametrize(
    "bad_line", ["000002.jpg 1 2 3 4 5 6 7 8 9", "000002.jpg 1 2 3 4 five 6 7 8 9 10"], ids=["fields", "number"]
)
def test_celeba_malformed_line_names_file_and_line(tmp_path, bad_line):
    make_celeba(tmp_path, wild=False)
    path = tmp_path / "Anno" / "list_landmarks_align_celeba.txt"
    lines = landmark_lines()
    lines[3] = bad_line  # the second image row, file line 4
    write_text(path, "\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=re.escape(f"{path}, line 4")):
        build_manifest("celeba_aligned", str(tmp_path))


def test_missing_annotation_file_is_named(tmp_path):
    make_celeba(tmp_path, wild=True)
    path = tmp_path / "Anno" / "list_bbox_celeba.txt"
    os.remove(path)
    with pytest.raises(ValueError, match=re.escape(str(path))):
        build_manifest("celeba_wild", str(tmp_path))


# ---------------------------------------------------------------- CUB aligned (HDF5)


def test_cub_aligned_writes_pngs_swaps_to_xy_and_masks_invisible(tmp_path):
    rng = np.random.default_rng(0)
    train_img = rng.integers(0, 100, size=(3, 3, 8, 8), dtype=np.uint8)
    test_img = rng.integers(0, 100, size=(2, 3, 8, 8), dtype=np.uint8)
    train_kp = rng.uniform(0, 1, size=(3, 4, 2))
    test_kp = rng.uniform(0, 1, size=(2, 4, 2))
    # cub.h5 stores (y, x) = (row, col): keypoint 0 of train image 1 sits on a white pixel at row 2, col 6
    train_img[1, :, 2, 6] = 255
    train_kp[1, 0] = [2.5 / 8, 6.5 / 8]
    train_vis = np.ones((3, 4))
    train_vis[1, 2] = 0
    test_vis = np.ones((2, 4))
    root = tmp_path / "data"
    root.mkdir()
    with h5py.File(root / "cub.h5", "w") as f:
        for name, value in [
            ("train_img", train_img),
            ("train_kp", train_kp),
            ("train_vis", train_vis),
            ("test_img", test_img),
            ("test_kp", test_kp),
            ("test_vis", test_vis),
        ]:
            f[name] = value
    workdir = tmp_path / "work"

    table = build_manifest("cub_aligned", str(root), workdir=str(workdir))
    assert column(table, "key") == ["train/00000", "train/00001", "train/00002", "test/00000", "test/00001"]
    assert column(table, "split") == ["train"] * 3 + ["test"] * 2
    row = row_of(table, "train/00001")
    assert row["uri"] == os.path.abspath(workdir / "cub_aligned" / "train" / "00001.png")
    pixels = np.asarray(Image.open(row["uri"]))
    assert np.array_equal(pixels, train_img[1].transpose(1, 2, 0))
    assert row["visible"] == [True, True, False, True]
    points = np.asarray(row["landmarks_xy"])
    assert points[0] == pytest.approx([6.5 / 8, 2.5 / 8])  # (x, y) = (col, row)
    x, y = points[0] * 8
    assert pixels[int(y), int(x)].tolist() == [255, 255, 255]
    assert np.isnan(points[2]).all()
    assert points[[1, 3]] == pytest.approx(train_kp[1][[1, 3]][:, ::-1])
    assert np.asarray(row_of(table, "test/00001")["landmarks_xy"]) == pytest.approx(test_kp[1][:, ::-1])

    with pytest.raises(ValueError, match="workdir"):
        build_manifest("cub_aligned", str(root))


# ---------------------------------------------------------------- CUB (CMR layout)

CUB_RECORDS = {
    "train": [
        ("001.Black_footed_Albatross/a1.jpg", (11, 21, 50, 40)),
        ("002.Laysan_Albatross/b1.jpg", (1, 1, 30, 10)),
        ("001.Black_footed_Albatross/a2.jpg", (1, 1, 30, 10)),
    ],
    "test": [
        ("001.Black_footed_Albatross/a3.jpg", (11, 21, 50, 40)),
        ("003.Sooty_Albatross/c1.jpg", (5, 5, 20, 20)),
    ],
}


def cub_parts():
    """15 parts, 1-based pixels: part 0 at (31, 31), part 1 at (9, 9), part 2 invisible, the rest at (20, 25)."""
    parts = np.zeros((3, 15))
    parts[:, :] = [[20], [25], [1]]
    parts[:, 0] = [31, 31, 1]
    parts[:, 1] = [9, 9, 1]
    parts[:, 2] = [0, 0, 0]
    return parts


def make_cub(root, sfm_lengths=None):
    base = root / "CUB_200_2011"
    for split, records in CUB_RECORDS.items():
        array = np.zeros((len(records),), dtype=[("rel_path", "O"), ("bbox", "O"), ("parts", "O"), ("mask", "O")])
        for i, (rel_path, (x1, y1, x2, y2)) in enumerate(records):
            array[i]["rel_path"] = rel_path
            array[i]["bbox"] = {"x1": float(x1), "y1": float(y1), "x2": float(x2), "y2": float(y2)}
            array[i]["parts"] = cub_parts()
            array[i]["mask"] = np.zeros((4, 4), np.uint8)
            save_image(str(base / "images" / rel_path), 60, 60)
        os.makedirs(base / "cachedir/cub/data", exist_ok=True)
        os.makedirs(base / "cachedir/cub/sfm", exist_ok=True)
        scipy.io.savemat(base / f"cachedir/cub/data/{split}_cub_cleaned.mat", {"images": array})
        sfm_length = (sfm_lengths or {}).get(split, len(records))
        scipy.io.savemat(base / f"cachedir/cub/sfm/anno_{split}.mat", {"sfm_anno": np.arange(sfm_length)})


def test_cub_cmr_crop_boxes_and_landmarks(tmp_path):
    make_cub(tmp_path)
    table = build_manifest("cub_all", str(tmp_path))
    assert column(table, "key") == [r for s in ("train", "test") for r, _ in CUB_RECORDS[s]]
    assert column(table, "split") == ["train"] * 3 + ["test"] * 2

    # box (11, 21, 50, 40): 0-based [10, 20, 49, 39], 40 x 20, padded [8, 19, 51, 40] -> 44 x 22,
    # square side 44, top moves up by 11 -> [8, 8, 52, 52]
    row = row_of(table, "001.Black_footed_Albatross/a1.jpg")
    assert row["crop_box"] == [8, 8, 52, 52]
    assert row["uri"] == os.path.abspath(tmp_path / "CUB_200_2011/images/001.Black_footed_Albatross/a1.jpg")
    points = np.asarray(row["landmarks_xy"])
    assert points[0] == pytest.approx([0.5, 0.5])  # (31 - 1 - 8) / 44
    assert points[1] == pytest.approx([0.0, 0.0])  # (9 - 1 - 8) / 44
    assert np.isnan(points[2]).all()
    assert points[3] == pytest.approx([(19 - 8) / 44, (24 - 8) / 44])
    assert row["visible"] == [True, True, False] + [True] * 12

    # box (1, 1, 30, 10): 0-based [0, 0, 29, 9], 30 x 10, padded [-1.5, -0.5, 30.5, 9.5] which Python rounds
    # half to even -> [-2, 0, 30, 10], 33 x 11, side 33, top moves up by 11 -> [-2, -11, 31, 22]
    row = row_of(table, "002.Laysan_Albatross/b1.jpg")
    assert row["crop_box"] == [-2, -11, 31, 22]
    assert row["landmarks_xy"][0] == pytest.approx([(30 + 2) / 33, (30 + 11) / 33])

    # the same box in the test split gets the same crop (no jitter)
    assert row_of(table, "001.Black_footed_Albatross/a3.jpg")["crop_box"] == [8, 8, 52, 52]


def test_cub_single_class_keeps_only_that_class(tmp_path):
    make_cub(tmp_path)
    assert column(build_manifest("cub_001", str(tmp_path)), "key") == [
        "001.Black_footed_Albatross/a1.jpg",
        "001.Black_footed_Albatross/a2.jpg",
        "001.Black_footed_Albatross/a3.jpg",
    ]
    assert column(build_manifest("cub_002", str(tmp_path)), "key") == ["002.Laysan_Albatross/b1.jpg"]
    table = build_manifest("cub_003", str(tmp_path))
    assert column(table, "key") == ["003.Sooty_Albatross/c1.jpg"] and column(table, "split") == ["test"]


def test_cub_sfm_length_mismatch_is_an_error(tmp_path):
    make_cub(tmp_path, sfm_lengths={"test": 3})
    with pytest.raises(ValueError, match=re.escape("anno_test.mat")):
        build_manifest("cub_all", str(tmp_path))


# ---------------------------------------------------------------- Tai-Chi


def make_taichi(root, frames=("video_b/0001.png", "video_a/0002.png", "video_a/0001.png")):
    """Video frames under train/ (unannotated) and the annotated evaluation images with their pickles."""
    for name in frames:
        save_image(str(root / "train" / name), 64, 64)
    annotations = {
        "train": pd.DataFrame(
            {
                "file_name": ["b.png", "a.png"],
                "value": [np.array([[64.0, 128.0], [0.0, 50.0]]), np.array([[10.0, 20.0], [30.0, 40.0]])],
            }
        ),
        "test": pd.DataFrame({"file_name": ["c.png"], "value": [np.array([[256.0, 0.0], [128.0, 128.0]])]}),
    }
    for split, frame in annotations.items():
        os.makedirs(root / "landmark", exist_ok=True)
        frame.to_pickle(root / "landmark" / f"taichi_{split}_gt.pkl")
        for name in frame["file_name"]:
            save_image(str(root / "eval_images/taichi-256" / split / name), 128, 128)


def test_taichi_learns_from_train_frames_and_regresses_on_eval_images(tmp_path):
    make_taichi(tmp_path)
    table = build_manifest("taichi", str(tmp_path))
    assert column(table, "key") == [
        "train/video_a/0001.png",  # frames sorted by path
        "train/video_a/0002.png",
        "train/video_b/0001.png",
        "eval_images/taichi-256/train/b.png",  # pickle order
        "eval_images/taichi-256/train/a.png",
        "eval_images/taichi-256/test/c.png",
    ]
    assert column(table, "split") == ["train"] * 3 + ["regression_train"] * 2 + ["test"]
    frame = row_of(table, "train/video_a/0002.png")
    assert frame["uri"] == os.path.abspath(tmp_path / "train/video_a/0002.png")
    assert frame["landmarks_xy"] is None and frame["visible"] is None  # no ground truth

    # discovery's --split train reads these frames, not the annotated images
    path = str(tmp_path / "manifest.parquet")
    write_manifest(table, path)
    assert [source.uri for source in list_sources(path, split="train")] == column(table, "uri")[:3]

    # the evaluation fits on the annotated train images and tests on the annotated test images
    info = DATASETS["taichi"]
    assert (info.fit_split, info.test_split) == ("regression_train", "test")
    assert all((i.fit_split, i.test_split) == ("train", "test") for name, i in DATASETS.items() if name != "taichi")
    row = row_of(table, "eval_images/taichi-256/train/b.png")
    assert row["uri"] == os.path.abspath(tmp_path / "eval_images/taichi-256/train/b.png")
    assert row["landmarks_xy"][0] == pytest.approx([0.25, 0.5])  # /256, not the 128-pixel image size
    assert all(math.isnan(v) for v in row["landmarks_xy"][1])  # a 0 coordinate is invisible
    assert row["visible"] == [True, False]
    row = row_of(table, "eval_images/taichi-256/test/c.png")
    assert row["visible"] == [False, True]
    assert row["landmarks_xy"][1] == pytest.approx([0.5, 0.5])


def test_taichi_without_train_frames_has_only_the_evaluation_images(tmp_path):
    make_taichi(tmp_path, frames=())
    table = build_manifest("taichi", str(tmp_path))
    assert column(table, "split") == ["regression_train"] * 2 + ["test"]


def test_evaluation_labels_only_the_fitting_and_test_splits(tmp_path):
    from skp_ray.evaluation import _evaluated_manifest

    make_taichi(tmp_path / "taichi")
    table = build_manifest("taichi", str(tmp_path / "taichi"))
    path = str(tmp_path / "manifest.parquet")
    write_manifest(table, path)
    out = tmp_path / "eval"
    evaluated = _evaluated_manifest(table, path, ("regression_train", "test"), str(out))
    assert evaluated == str(out / "manifest_evaluated.parquet")
    assert column(read_manifest(evaluated), "key") == column(table, "key")[3:]
    # a manifest without other rows is labelled as it is
    assert _evaluated_manifest(table.slice(3), path, ("regression_train", "test"), str(out)) == path
    with pytest.raises(ValueError, match="no 'regression_train' rows"):
        _evaluated_manifest(table.slice(0, 3), path, ("regression_train", "test"), str(out))


# ---------------------------------------------------------------- DeepFashion


def make_deepfashion(root, test_json_count=2):
    write_text(root / "data_train.csv", "id,file_name,other\n0, MEN/a.jpg ,x\n1,WOMEN/b.jpg,y\n")
    write_text(root / "data_test.csv", "id,file_name,other\n0,MEN/c.jpg,z\n1,MEN/d.jpg,z\n")
    keypoints = {
        "train": [[[64, 32], [128, 256]], [[0, 0], [256, 128]]],
        "test": [[[32, 32], [64, 64]]] * test_json_count,
    }
    for split, points in keypoints.items():
        write_text(root / f"data_{split}.json", json.dumps([{"keypoints": p} for p in points]))
    for name in ("MEN/a.jpg", "WOMEN/b.jpg", "MEN/c.jpg", "MEN/d.jpg"):
        save_image(str(root / "img" / name), 64, 64)


def test_deepfashion_pairs_csv_and_json_by_position(tmp_path):
    make_deepfashion(tmp_path)
    table = build_manifest("deepfashion", str(tmp_path))
    assert column(table, "key") == ["MEN/a.jpg", "WOMEN/b.jpg", "MEN/c.jpg", "MEN/d.jpg"]
    assert column(table, "split") == ["train", "train", "test", "test"]
    row = row_of(table, "MEN/a.jpg")
    assert row["uri"] == os.path.abspath(tmp_path / "img" / "MEN" / "a.jpg")
    assert np.asarray(row["landmarks_xy"]) == pytest.approx(np.array([[0.25, 0.125], [0.5, 1.0]]))
    assert row_of(table, "WOMEN/b.jpg")["visible"] == [True, True]


def test_deepfashion_count_mismatch_names_both_files(tmp_path):
    make_deepfashion(tmp_path, test_json_count=3)
    with pytest.raises(ValueError) as error:
        build_manifest("deepfashion", str(tmp_path))
    assert str(tmp_path / "data_test.csv") in str(error.value)
    assert str(tmp_path / "data_test.json") in str(error.value)


# ---------------------------------------------------------------- Human3.6M (masked)

H36M_SUBJECTS = (1, 5, 6, 7, 8, 9, 11)


def h36m_keypoints_yx(seed):
    return np.random.default_rng(seed).uniform(0, 1, size=(32, 2))


def test_h36m_prefix_matching_order_and_axes(tmp_path):
    frames = {  # created in unsorted order on purpose
        (1, "WalkingDog 1"): ["0002", "0001"],
        (1, "Walking 1"): ["0003", "0001", "0002"],
        (1, "Eating 1"): ["0001"],
        (1, "Directions"): ["0001"],
        (11, "Posing 1"): ["0001"],
    }
    for subject in H36M_SUBJECTS:
        os.makedirs(tmp_path / f"S{subject}" / "WithBackground", exist_ok=True)
    for seed, ((subject, folder), names) in enumerate(frames.items()):
        for frame in names:
            base = tmp_path / f"S{subject}"
            save_image(str(base / "WithBackground" / folder / f"{frame}.jpg"), 16, 16)
            save_image(str(base / "BackgroudMask" / folder / f"{frame}.png"), 16, 16, (255, 255, 255))
            os.makedirs(base / "Landmarks" / folder, exist_ok=True)
            scipy.io.savemat(
                base / "Landmarks" / folder / f"{frame}.mat",
                {"keypoints_2d": h36m_keypoints_yx(seed * 10 + int(frame))},
            )

    table = build_manifest("h36m", str(tmp_path))
    assert column(table, "key") == [
        "S1/Directions/0001",
        "S1/Walking 1/0001",
        "S1/Walking 1/0002",
        "S1/Walking 1/0003",
        "S1/WalkingDog 1/0001",
        "S1/WalkingDog 1/0002",
        "S11/Posing 1/0001",
    ]
    assert column(table, "split") == ["train"] * 6 + ["test"]
    row = row_of(table, "S1/Walking 1/0002")
    assert row["uri"] == os.path.abspath(tmp_path / "S1/WithBackground/Walking 1/0002.jpg")
    assert row["mask_uri"] == os.path.abspath(tmp_path / "S1/BackgroudMask/Walking 1/0002.png")
    assert row["crop_box"] is None
    yx = h36m_keypoints_yx(1 * 10 + 2)  # "Walking 1" is the second folder created
    assert np.asarray(row["landmarks_xy"]) == pytest.approx(yx[:, ::-1])
    assert row["visible"] == [True] * 32


# ---------------------------------------------------------------- Human3.6M (unaligned)

H36M_IMAGE_SIZE = (400, 300)


def unaligned_pose(camera, frame):
    """32 pixel (x, y) points spanning x 150..250 and y 100..160, varied by camera and frame."""
    rng = np.random.default_rng(camera % 1000 + frame)
    points = np.column_stack([rng.uniform(150, 250, 32), rng.uniform(100, 160, 32)])
    points[0], points[1] = [150, 100], [250, 160]
    return points


def make_h36m_unaligned(root, extra_rows=()):
    images = {
        (1, "Walking 1"): {54138969: [2, 1], 55011271: [1]},
        (1, "Eating 1"): {54138969: [1]},
        (11, "Greeting"): {54138969: [5]},
    }
    for subject in H36M_SUBJECTS:
        os.makedirs(root / f"S{subject}", exist_ok=True)
    for (subject, folder), cameras in images.items():
        rows = [(camera, frame) for camera, frames in cameras.items() for frame in frames] + list(extra_rows)
        rows.append((60457274, 1))  # a row without an image is fine
        for camera, frames in cameras.items():
            for frame in frames:
                save_image(
                    str(root / f"S{subject}" / folder / "imageSequence" / str(camera) / f"img_{frame:06d}.jpg"),
                    *H36M_IMAGE_SIZE,
                )
        with h5py.File(root / f"S{subject}" / folder / "annot.h5", "w") as f:
            f["camera"] = np.array([c for c, _ in rows])
            f["frame"] = np.array([fr for _, fr in rows])
            f["pose/2d"] = np.stack([unaligned_pose(c, fr) for c, fr in rows])


def test_h36m_unaligned_crop_with_recomputed_jitter(tmp_path):
    make_h36m_unaligned(tmp_path)
    table = build_manifest("h36m_unaligned", str(tmp_path), seed=7)
    assert column(table, "key") == [
        "S1/Walking 1/54138969/000001",
        "S1/Walking 1/54138969/000002",
        "S1/Walking 1/55011271/000001",
        "S11/Greeting/54138969/000005",
    ]
    assert column(table, "split") == ["train"] * 3 + ["test"]

    key = "S1/Walking 1/55011271/000001"
    row = row_of(table, key)
    assert row["uri"] == os.path.abspath(tmp_path / "S1/Walking 1/imageSequence/55011271/img_000001.jpg")
    jitter_x, jitter_y = torch.randint(-100, 100, (2,), generator=keyed_generator(7, "h36m_unaligned", key)).tolist()
    # person 100 x 60 in a 400 x 300 image: side 100, margins 100; the square's top is 20 above y_min
    x0 = max(0, 150 - 100 + jitter_x)
    y0 = max(0, 100 - 20 - 100 + jitter_y)
    x1 = min(400, x0 + 300)
    y1 = min(300, y0 + 300)
    left, top = int(x0), int(y0)
    box = [left, top, left + int(x1 - x0), top + int(y1 - y0)]
    assert row["crop_box"] == box
    points = unaligned_pose(55011271, 1)
    expected = (points - [box[0], box[1]]) / [box[2] - box[0], box[3] - box[1]]
    assert np.asarray(row["landmarks_xy"]) == pytest.approx(expected)
    assert row["visible"] == [True] * 32

    again = build_manifest("h36m_unaligned", str(tmp_path), seed=7)
    assert column(again, "crop_box") == column(table, "crop_box")
    other = build_manifest("h36m_unaligned", str(tmp_path), seed=8)
    assert column(other, "crop_box") != column(table, "crop_box")


def test_h36m_unaligned_ambiguous_annotation_is_named(tmp_path):
    make_h36m_unaligned(tmp_path, extra_rows=[(54138969, 1)])
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "S1" / "Walking 1" / "annot.h5"))):
        build_manifest("h36m_unaligned", str(tmp_path))


# ---------------------------------------------------------------- custom and samples


def test_custom_lists_every_image(tmp_path):
    save_image(str(tmp_path / "b.png"), 8, 8)
    save_image(str(tmp_path / "sub" / "a.jpg"), 8, 8)
    write_text(tmp_path / "notes.txt", "not an image")
    table = build_manifest("custom", str(tmp_path))
    assert column(table, "key") == ["b.png", "sub/a.jpg"]
    assert column(table, "split") == ["all", "all"]
    assert column(table, "uri") == [str(tmp_path / "b.png"), str(tmp_path / "sub" / "a.jpg")]
    assert column(table, "landmarks_xy") == [None, None] and column(table, "visible") == [None, None]
    assert DATASETS["custom"].metric is None and DATASETS["custom"].regressor is None


def test_custom_reads_fsspec_urls():
    import fsspec

    fs = fsspec.filesystem("memory")
    for name in ("x/2.png", "x/1.png"):
        with fs.open(f"/custom-test/{name}", "wb") as f:
            Image.new("RGB", (4, 4)).save(f, format="PNG")
    table = build_manifest("custom", "memory://custom-test")
    assert column(table, "key") == ["x/1.png", "x/2.png"]
    assert all(uri.startswith("memory://") for uri in column(table, "uri"))


def test_samples_split_and_axes(tmp_path):
    write_sample_images(tmp_path, n=5, size=32, seed=3)
    with open(tmp_path / "landmarks.json") as f:
        yx = json.load(f)
    table = build_manifest("samples", str(tmp_path))
    assert column(table, "key") == [f"sample_{i:03d}.png" for i in range(5)]
    assert column(table, "split") == ["train"] * 3 + ["test"] * 2  # ceil(5 / 4) = 2 test images
    row = row_of(table, "sample_004.png")
    assert row["uri"] == os.path.join(str(tmp_path), "sample_004.png")
    assert np.asarray(row["landmarks_xy"]) == pytest.approx(np.array(yx["sample_004.png"])[:, ::-1])


# ---------------------------------------------------------------- manifest and registry


def test_manifest_round_trip_keeps_schema_and_dataset(tmp_path):
    make_deepfashion(tmp_path)
    table = build_manifest("deepfashion", str(tmp_path))
    for path in (str(tmp_path / "out" / "manifest.parquet"), "memory://manifests/deepfashion.parquet"):
        write_manifest(table, path)
        back = read_manifest(path)
        assert back.schema.equals(MANIFEST_SCHEMA)
        assert dataset_of(back) == "deepfashion"
        assert back.to_pylist() == table.to_pylist()


def test_read_manifest_names_file_with_missing_columns(tmp_path):
    path = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"uri": ["a.png"]}), path)
    with pytest.raises(ValueError, match=re.escape(str(path))):
        read_manifest(str(path))


def test_manifest_table_validates_rows():
    row = {"uri": "/a.png", "key": "a", "split": "train", "landmarks_xy": [[0.1, 0.2]], "visible": [True]}
    with pytest.raises(ValueError, match="duplicate key"):
        manifest_table([row, dict(row, uri="/b.png")], "x")
    with pytest.raises(ValueError, match="landmarks"):
        manifest_table([row, dict(row, key="b", landmarks_xy=[[0.1, 0.2], [0.3, 0.4]], visible=[True, True])], "x")
    with pytest.raises(ValueError, match="visibility"):
        manifest_table([dict(row, visible=[True, False])], "x")


def test_unknown_dataset_lists_known_names(tmp_path):
    with pytest.raises(ValueError) as error:
        build_manifest("imagenet", str(tmp_path))
    assert "imagenet" in str(error.value)
    for name in DATASETS:
        assert name in str(error.value)


def test_registry_metrics_and_regressors():
    expected = {
        "celeba_aligned": ("inter_eye_distance", "plain"),
        "celeba_wild": ("inter_eye_distance", "plain"),
        "cub_aligned": ("visible", "visible"),
        "cub_001": ("visible", "visible"),
        "cub_002": ("visible", "visible"),
        "cub_003": ("visible", "visible"),
        "cub_all": ("visible", "visible"),
        "taichi": ("mean_average_error", "visible"),
        "deepfashion": ("pck", "plain"),
        "h36m": ("orientation_invariant", "swap"),
        "h36m_unaligned": ("orientation_invariant", "swap"),
        "custom": (None, None),
        "samples": ("inter_eye_distance", "plain"),
    }
    assert {name: (info.metric, info.regressor) for name, info in DATASETS.items()} == expected
    assert all(info.name == name and info.description for name, info in DATASETS.items())


def test_layout_without_images_is_an_error(tmp_path):
    for subject in H36M_SUBJECTS:
        os.makedirs(tmp_path / f"S{subject}" / "WithBackground" / "Eating 1", exist_ok=True)
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path}: no images found for dataset 'h36m'")):
        build_manifest("h36m", str(tmp_path))
