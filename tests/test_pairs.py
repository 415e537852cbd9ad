"""Pairs manifests: the published benchmarks' adapters on miniature layouts, user pairs, validation."""

import csv
import itertools
import json
import os
import re
import shutil

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pair_fixtures import make_cub_pairs, make_pf_willow, make_spair

from skp_ray.correspondence.pairs import (
    PAIRS_METADATA_KEY,
    PAIRS_SCHEMA,
    PairsError,
    build_pairs,
    pairs_dataset,
    pairs_table,
    read_pairs,
    write_pairs,
)
from skp_ray.datasets.manifest import DatasetError


def column(table, name):
    return table.column(name).to_pylist()


def row_of(table, pair_id):
    return table.slice(column(table, "pair_id").index(pair_id), 1).to_pylist()[0]


def read_lines(path):
    with open(path) as f:
        return f.read().splitlines()


def assert_schema(table, dataset):
    assert table.schema.equals(PAIRS_SCHEMA)
    assert table.schema.metadata[PAIRS_METADATA_KEY] == b"1"
    assert pairs_dataset(table) == dataset


# ---------------------------------------------------------------- SPair-71k


@pytest.fixture
def spair(tmp_path):
    return make_spair(tmp_path / "SPair-71k")


def test_spair_test_pairs_are_the_annotations(spair):
    table = build_pairs("spair", str(spair))
    assert_schema(table, "spair")
    layout = read_lines(spair / "Layout/large/test.txt")
    assert column(table, "pair_id") == [f"test/{name}" for name in layout]
    assert len(layout) == 4 and column(table, "split") == ["test"] * 4
    assert column(table, "category") == [name.split(":")[1] for name in layout]

    name = layout[0]
    with open(spair / "PairAnnotation" / "test" / f"{name}.json") as f:
        annotation = json.load(f)
    row = row_of(table, f"test/{name}")
    images = spair / "JPEGImages" / annotation["category"]
    assert row["source_uri"] == os.path.abspath(images / annotation["src_imname"])
    assert row["target_uri"] == os.path.abspath(images / annotation["trg_imname"])
    assert row["source_points_xy"] == [[float(x), float(y)] for x, y in annotation["src_kps"]]
    assert row["target_points_xy"] == [[float(x), float(y)] for x, y in annotation["trg_kps"]]
    assert row["target_box_xyxy"] == [float(v) for v in annotation["trg_bndbox"]]
    assert (row["source_width"], row["source_height"]) == tuple(annotation["src_imsize"][:2])
    assert (row["target_width"], row["target_height"]) == tuple(annotation["trg_imsize"][:2])
    for uri in column(table, "source_uri") + column(table, "target_uri"):
        assert os.path.isfile(uri)


def test_spair_point_is_on_its_drawn_part(spair):
    """The fixture draws part i in one colour in every image: the ground truth points at the same colour."""
    from PIL import Image

    for row in build_pairs("spair", str(spair)).to_pylist():
        source, target = Image.open(row["source_uri"]).convert("RGB"), Image.open(row["target_uri"]).convert("RGB")
        for (sx, sy), (tx, ty) in zip(row["source_points_xy"], row["target_points_xy"]):
            a, b = source.getpixel((sx, sy)), target.getpixel((tx, ty))
            assert max(abs(u - v) for u, v in zip(a, b)) < 40, (row["pair_id"], a, b)


def test_spair_splits_categories_and_root_forms(spair):
    trn = build_pairs("SPair", str(spair.parent), split="trn")  # the folder holding SPair-71k/, any case
    assert column(trn, "pair_id") == [f"trn/{name}" for name in read_lines(spair / "Layout/large/trn.txt")]
    dogs = build_pairs("spair", str(spair), categories=["dog"])
    assert set(column(dogs, "category")) == {"dog"} and dogs.num_rows == 2
    assert build_pairs("spair", str(spair), categories=["all"]).num_rows == 4
    with pytest.raises(PairsError, match=re.escape("unknown category 'horse'; categories found: ['cat', 'dog']")):
        build_pairs("spair", str(spair), categories=["horse"])
    with pytest.raises(PairsError, match=re.escape("unknown split 'train'; expected one of ['trn', 'val', 'test']")):
        build_pairs("spair", str(spair), split="train")
    with pytest.raises(PairsError, match="unknown pairs dataset 'spair-72k'; expected one of spair, pf-willow, cub-"):
        build_pairs("spair-72k", str(spair))


def test_spair_missing_image_names_image_and_annotation(spair):
    name = read_lines(spair / "Layout/large/test.txt")[0]
    with open(spair / "PairAnnotation" / "test" / f"{name}.json") as f:
        annotation = json.load(f)
    image = spair / "JPEGImages" / annotation["category"] / annotation["trg_imname"]
    os.remove(image)
    with pytest.raises(PairsError, match=re.escape(f"{image}: missing image, named by {spair}/PairAnnotation/test/")):
        build_pairs("spair", str(spair))


def test_spair_missing_annotation_and_bad_layout_line(spair):
    layout = spair / "Layout/large/test.txt"
    names = read_lines(layout)
    os.remove(spair / "PairAnnotation" / "test" / f"{names[1]}.json")
    with pytest.raises(PairsError, match=re.escape(f"named by {layout}, line 2")):
        build_pairs("spair", str(spair))
    layout.write_text(f"{names[0]}\nnot-a-pair\n")
    with pytest.raises(PairsError, match=re.escape(f"{layout}, line 2: 'not-a-pair'")):
        build_pairs("spair", str(spair))
    shutil.rmtree(spair / "Layout")
    with pytest.raises(PairsError, match=re.escape(f"{spair}/Layout/large: missing")):
        build_pairs("spair", str(spair))


def test_spair_point_outside_the_image_names_annotation_and_pair(spair):
    name = read_lines(spair / "Layout/large/test.txt")[0]
    path = spair / "PairAnnotation" / "test" / f"{name}.json"
    annotation = json.loads(path.read_text())
    width = annotation["trg_imsize"][0]
    annotation["trg_kps"][1] = [width, 3]  # x = width is one pixel past the last column
    path.write_text(json.dumps(annotation))
    expected = f"{path}, pair 'test/{name}': target_points_xy[1] = ({width}, 3) is outside"
    with pytest.raises(PairsError, match=re.escape(expected)):
        build_pairs("spair", str(spair))


def test_spair_on_object_storage(spair):
    fs = fsspec.filesystem("memory")
    fs.put(str(spair), "/pairs-test/SPair-71k", recursive=True)
    try:
        table = build_pairs("spair", "memory://pairs-test/SPair-71k")
        local = build_pairs("spair", str(spair))
        assert column(table, "source_points_xy") == column(local, "source_points_xy")
        for uri in column(table, "target_uri"):
            assert uri.startswith("memory://") and "/pairs-test/SPair-71k/JPEGImages/" in uri
            with fsspec.open(uri, "rb") as f:
                assert f.read(3) == b"\xff\xd8\xff"  # a JPEG
        write_pairs(table, "memory://pairs-test/out/pairs.parquet")
        assert read_pairs("memory://pairs-test/out/pairs.parquet").equals(table)
    finally:
        fs.rm("/pairs-test", recursive=True)


def test_fixtures_are_seeded(tmp_path):
    first, second = make_spair(tmp_path / "a", seed=3), make_spair(tmp_path / "b", seed=3)
    names = sorted(p.relative_to(first).as_posix() for p in first.rglob("*") if p.is_file())
    assert names == sorted(p.relative_to(second).as_posix() for p in second.rglob("*") if p.is_file())
    assert all((first / n).read_bytes() == (second / n).read_bytes() for n in names)
    fixed = build_pairs("spair", str(make_spair(tmp_path / "c", image_size=(50, 40))))
    assert set(column(fixed, "target_width")) == {50} and set(column(fixed, "target_height")) == {40}


# ---------------------------------------------------------------- PF-Willow


def pf_willow_rows(root):
    with open(root / "test_pairs.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_pf_willow_pairs_points_and_keypoint_box(tmp_path):
    root = make_pf_willow(tmp_path / "PF-WILLOW")
    table = build_pairs("pf-willow", str(tmp_path))  # the folder holding PF-WILLOW/
    assert_schema(table, "pf-willow")
    assert column(table, "pair_id") == ["0000", "0001", "0002", "0003"]
    assert column(table, "category") == ["car(G)", "car(G)", "duck(S)", "duck(S)"]
    assert column(table, "split") == ["test"] * 4

    record = pf_willow_rows(root)[2]
    row = table.to_pylist()[2]
    source = [[float(record[f"XA{i}"]), float(record[f"YA{i}"])] for i in range(1, 11)]
    target = [[float(record[f"XB{i}"]), float(record[f"YB{i}"])] for i in range(1, 11)]
    assert row["source_points_xy"] == source and row["target_points_xy"] == target
    xs, ys = zip(*target)
    assert row["target_box_xyxy"] == [min(xs), min(ys), max(xs), max(ys)]
    assert record["imageA"].startswith("PF-dataset/duck(S)/")
    assert row["source_uri"] == os.path.abspath(root / record["imageA"].split("/", 1)[1])
    assert row["target_uri"] == os.path.abspath(root / record["imageB"].split("/", 1)[1])
    assert all(os.path.isfile(uri) for uri in column(table, "source_uri") + column(table, "target_uri"))
    assert row["source_width"] is None and row["target_height"] is None  # the CSV states no sizes

    assert build_pairs("pf_willow", str(root), categories=["duck(S)"]).num_rows == 2
    with pytest.raises(PairsError, match=re.escape("unknown split 'trn'; expected one of ['test']")):
        build_pairs("pf-willow", str(root), split="trn")


def test_pf_willow_bad_cell_and_header_name_file_and_line(tmp_path):
    root = make_pf_willow(tmp_path)
    path = root / "test_pairs.csv"
    lines = read_lines(path)
    cells = lines[2].split(",")
    cells[5] = "n/a"  # XA4 of the second pair
    path.write_text("\n".join([lines[0], lines[1], ",".join(cells)]) + "\n")
    with pytest.raises(PairsError, match=re.escape(f"{path}, line 3: XA4 is 'n/a'; expected a finite number")):
        build_pairs("pf-willow", str(root))
    path.write_text(lines[0].replace("XA1", "X1") + "\n")
    with pytest.raises(PairsError, match=re.escape(f"{path}, line 1: header")):
        build_pairs("pf-willow", str(root))


# ---------------------------------------------------------------- CUB-200-2011


def cub_tables(root):
    base = root / "CUB_200_2011"
    images = dict(line.split(maxsplit=1) for line in read_lines(base / "images.txt"))
    train = dict(line.split() for line in read_lines(base / "train_test_split.txt"))
    boxes = {line.split()[0]: [float(v) for v in line.split()[1:]] for line in read_lines(base / "bounding_boxes.txt")}
    parts = {}
    for line in read_lines(base / "parts/part_locs.txt"):
        image_id, part, x, y, visible = line.split()
        parts.setdefault(image_id, []).append((float(x), float(y), visible == "1"))
    return images, train, boxes, parts


def expected_cub_pairs(root, classes, split_flag):
    images, train, _, parts = cub_tables(root)
    pairs = []
    for class_name in classes:
        members = [i for i, path in images.items() if path.startswith(class_name + "/") and train[i] == split_flag]
        for a, b in itertools.combinations(members, 2):
            if any(p[2] and q[2] for p, q in zip(parts[a], parts[b])):
                pairs.append(f"{a}-{b}")
    return pairs


def test_cub_pairs_are_the_published_selection(tmp_path):
    root = make_cub_pairs(tmp_path)
    table = build_pairs("cub-pairs", str(root))
    assert_schema(table, "cub-pairs")
    classes = ["001.Black_footed_Albatross", "002.Laysan_Albatross", "003.Sooty_Albatross"]
    assert sorted(set(column(table, "category"))) == classes  # class 004 is not among the first three
    assert column(table, "pair_id") == expected_cub_pairs(root, classes, "0")
    assert "8-12" not in column(table, "pair_id")  # class 002's test images 8 and 12 share no visible part
    assert column(table, "split") == ["test"] * table.num_rows

    images, _, boxes, parts = cub_tables(root)
    row = table.to_pylist()[1]
    a, b = row["pair_id"].split("-")
    common = [(p[:2], q[:2]) for p, q in zip(parts[a], parts[b]) if p[2] and q[2]]
    assert row["source_points_xy"] == [list(p) for p, _ in common]
    assert row["target_points_xy"] == [list(q) for _, q in common]
    x, y, w, h = boxes[b]
    assert row["target_box_xyxy"] == [x, y, x + w, y + h]
    assert row["source_uri"] == os.path.abspath(root / "CUB_200_2011" / "images" / images[a])
    assert all(os.path.isfile(uri) for uri in column(table, "source_uri") + column(table, "target_uri"))


def test_cub_pairs_categories_and_splits(tmp_path):
    root = make_cub_pairs(tmp_path)
    every = build_pairs("cub-pairs", str(root / "CUB_200_2011"), categories=["all"])
    assert "004.Groove_billed_Ani" in column(every, "category")
    by_number = build_pairs("cub-pairs", str(root), categories=["4", "002"])
    assert sorted(set(column(by_number, "category"))) == ["002.Laysan_Albatross", "004.Groove_billed_Ani"]
    train = build_pairs("cub-pairs", str(root), split="train")
    classes = ["001.Black_footed_Albatross", "002.Laysan_Albatross", "003.Sooty_Albatross"]
    assert column(train, "pair_id") == expected_cub_pairs(root, classes, "1")
    with pytest.raises(PairsError, match=re.escape("unknown category '9'; categories found: ['001.Black")):
        build_pairs("cub-pairs", str(root), categories=["9"])


def test_cub_bad_tables_name_file_and_line(tmp_path):
    root = make_cub_pairs(tmp_path)
    boxes = root / "CUB_200_2011" / "bounding_boxes.txt"
    lines = read_lines(boxes)
    boxes.write_text("\n".join(lines[:3] + ["4 1.0 2.0 three 4.0"] + lines[4:]) + "\n")
    with pytest.raises(PairsError, match=re.escape(f"{boxes}, line 4: '4 1.0 2.0 three 4.0'; expected 5 fields")):
        build_pairs("cub-pairs", str(root))
    boxes.write_text("\n".join(lines[1:]) + "\n")
    with pytest.raises(PairsError, match=re.escape(f"{boxes}: no line for image ids ['1']")):
        build_pairs("cub-pairs", str(root))
    os.remove(boxes)
    with pytest.raises(PairsError, match=re.escape(f"{boxes}: missing file")):
        build_pairs("cub-pairs", str(root))


# ---------------------------------------------------------------- user pairs


USER_HEADER = [
    "pair_id",
    "source_uri",
    "target_uri",
    "source_points_xy",
    "target_points_xy",
    "target_box_xyxy",
    "category",
    "split",
    "source_width",
    "source_height",
    "target_width",
    "target_height",
]
GOOD_ROW = ["p1", "images/a.jpg", "images/b.jpg", "[[10, 20], [30, 5.5]]", "[[11, 21], [31, 6]]", "[0, 0, 40, 30]"]
GOOD_ROW += ["bird", "test", "64", "48", "40", "30"]


def write_csv(path, rows, header=USER_HEADER):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([header, *rows])
    return path


def test_user_csv_with_relative_uris_and_defaults(tmp_path):
    second = ["", "/data/c.png", "s3://bucket/d.png", "[[1, 2]]", "", "", "", "", "", "", "", ""]
    path = write_csv(tmp_path / "lists" / "pairs.csv", [GOOD_ROW, second])
    table = read_pairs(path)
    assert_schema(table, "user")
    first, other = table.to_pylist()
    assert first == {
        "pair_id": "p1",
        "source_uri": str(tmp_path / "lists" / "images" / "a.jpg"),
        "target_uri": str(tmp_path / "lists" / "images" / "b.jpg"),
        "source_points_xy": [[10.0, 20.0], [30.0, 5.5]],
        "target_points_xy": [[11.0, 21.0], [31.0, 6.0]],
        "target_box_xyxy": [0.0, 0.0, 40.0, 30.0],
        "category": "bird",
        "split": "test",
        "source_width": 64,
        "source_height": 48,
        "target_width": 40,
        "target_height": 30,
    }
    assert other["source_uri"] == "/data/c.png" and other["target_uri"] == "s3://bucket/d.png"
    assert other["target_points_xy"] is None and other["target_box_xyxy"] is None
    assert other["category"] == "" and other["split"] == "all"
    assert re.fullmatch("[0-9a-f]{16}", other["pair_id"])

    moved = write_csv(tmp_path / "elsewhere" / "pairs.csv", [GOOD_ROW, second])
    assert column(read_pairs(moved), "pair_id") == column(table, "pair_id")  # the hash survives a move
    assert column(read_pairs(path, split="all"), "pair_id") == [other["pair_id"]]
    expected = f"{path}: no pairs in split 'val'; splits present: ['all', 'test']"
    with pytest.raises(PairsError, match=re.escape(expected)):
        read_pairs(path, split="val")


def test_user_parquet_with_lists_and_json_text(tmp_path):
    table = pa.table(
        {
            "source_uri": ["a.jpg", "b.jpg"],
            "target_uri": ["b.jpg", "gs://bucket/c.jpg"],
            "source_points_xy": [[[1.0, 2.0]], [[3.0, 4.0], [5.0, 6.0]]],
            "target_box_xyxy": ['[1, 1, 9, 9]', None],  # JSON text is read too
            "target_width": [10, None],
            "target_height": [10, None],
        }
    )
    path = tmp_path / "user.parquet"
    pq.write_table(table, path)
    pairs = read_pairs(str(path))
    assert_schema(pairs, "user")
    assert column(pairs, "source_uri") == [str(tmp_path / "a.jpg"), str(tmp_path / "b.jpg")]
    assert column(pairs, "target_uri")[1] == "gs://bucket/c.jpg"
    assert column(pairs, "source_points_xy")[1] == [[3.0, 4.0], [5.0, 6.0]]
    assert column(pairs, "target_box_xyxy") == [[1.0, 1.0, 9.0, 9.0], None]
    assert column(pairs, "target_width") == [10, None]


def bad_row(name, message, **changes):
    """A second CSV row (pair p2 unless changed) with ``changes`` to GOOD_ROW's cells, and the error it gives."""
    row = list(GOOD_ROW)
    for name, value in {"pair_id": "p2", **changes}.items():
        row[USER_HEADER.index(name)] = value
    return pytest.param(row, f"pair {row[0]!r}: {message}", id=name)


BAD_ROWS = [
    bad_row("empty", "source_points_xy is empty", source_points_xy="[]"),
    bad_row("count", "1 target points for 2 source points", target_points_xy="[[1, 2]]"),
    bad_row("source-outside", "source_points_xy[0] = (64, 2) is outside the 64", source_points_xy="[[64, 2], [3, 4]]"),
    bad_row("target-outside", "target_points_xy[1] = (3, -0.5) is outside", target_points_xy="[[1, 2], [3, -0.5]]"),
    bad_row("empty-box", "target_box_xyxy [5, 5, 5, 9] is empty", target_box_xyxy="[5, 5, 5, 9]"),
    bad_row("box-outside", "target_box_xyxy [0, 0, 41, 30] reaches outside", target_box_xyxy="[0, 0, 41, 30]"),
    bad_row("box-length", "target_box_xyxy is [1, 2, 3]; expected 4 finite", target_box_xyxy="[1, 2, 3]"),
    bad_row("json", "source_points_xy '[[1, 2], [3]' is not JSON", source_points_xy="[[1, 2], [3]"),
    bad_row("point-shape", "source_points_xy is [[1, 2, 3]]; expected a list", source_points_xy="[[1, 2, 3]]"),
    bad_row("size", "source_width is '64.5'; expected a whole number", source_width="64.5"),
    bad_row("half-size", "target_width is None; expected a positive integer, with target_width", target_width=""),
    bad_row("duplicate", "duplicate pair id, first at", pair_id="p1"),
]


@pytest.mark.parametrize(("second_row", "message"), BAD_ROWS)
def test_user_csv_errors_name_file_line_and_pair(tmp_path, second_row, message):
    path = write_csv(tmp_path / "pairs.csv", [GOOD_ROW, second_row])
    with pytest.raises(PairsError, match=re.escape(f"{path}, line 3, {message}")):
        read_pairs(str(path))


def test_user_files_with_wrong_columns(tmp_path):
    missing = write_csv(tmp_path / "missing.csv", [["a.jpg", "[[1, 2]]"]], header=["source_uri", "source_points_xy"])
    with pytest.raises(PairsError, match=re.escape(f"{missing}: columns ['target_uri'] are missing")):
        read_pairs(missing)
    typo_header = ["pair_id", "source_uri", "target_uri", "source_point_xy"]
    typo = write_csv(tmp_path / "typo.csv", [GOOD_ROW[:4]], header=typo_header)
    with pytest.raises(PairsError, match=re.escape(f"{typo}: columns ['source_points_xy'] are missing")):
        read_pairs(typo)
    extra = write_csv(tmp_path / "extra.csv", [GOOD_ROW + ["x"]], header=USER_HEADER + ["notes"])
    with pytest.raises(PairsError, match=re.escape(f"{extra}: unknown columns ['notes']")):
        read_pairs(extra)
    ragged = tmp_path / "ragged.csv"
    ragged.write_text("source_uri,target_uri,source_points_xy\na.jpg,b.jpg,[[1, 2]]\n")  # the JSON is not quoted
    with pytest.raises(PairsError, match=re.escape(f"{ragged}, line 2: the cells do not line up")):
        read_pairs(ragged)
    with pytest.raises(PairsError, match=re.escape(f"{tmp_path / 'absent.csv'}: missing file")):
        read_pairs(tmp_path / "absent.csv")
    assert issubclass(PairsError, DatasetError) and issubclass(PairsError, ValueError)


# ---------------------------------------------------------------- the manifest


def test_round_trip_keeps_schema_and_metadata(tmp_path):
    make_spair(tmp_path / "SPair-71k")
    table = build_pairs("spair", str(tmp_path), split="val")
    path = tmp_path / "out" / "pairs.parquet"
    write_pairs(table, path)
    back = read_pairs(path)
    assert back.equals(table)
    assert back.schema.metadata == table.schema.metadata == {b"skp_ray.pairs": b"1", b"skp_ray.dataset": b"spair"}
    assert read_pairs(path, split="val").num_rows == table.num_rows
    remote = "memory://pairs-round-trip/pairs.parquet"
    write_pairs(table, remote)  # local image paths stay local paths when the manifest lives elsewhere
    try:
        assert read_pairs(remote).equals(table)
    finally:
        fsspec.filesystem("memory").rm("/pairs-round-trip", recursive=True)
    with pytest.raises(PairsError, match=re.escape("no pairs in split 'test'; splits present: ['val']")):
        read_pairs(path, split="test")
    with pytest.raises(PairsError, match="not a pairs manifest"):
        write_pairs(pa.table({"pair_id": ["a"]}), tmp_path / "bad.parquet")


def test_pairs_table_checks_rows(tmp_path):
    row = {
        "pair_id": "x",
        "source_uri": str(tmp_path / "a.png"),
        "target_uri": "memory://b.png",
        "source_points_xy": [[1, 2]],
        "split": "test",
    }
    table = pairs_table([row], "mine")
    assert_schema(table, "mine")
    assert table.to_pylist()[0]["category"] == "" and table.to_pylist()[0]["target_points_xy"] is None
    with pytest.raises(PairsError, match=re.escape("pairs of 'mine', row 0, pair 'x': source_uri 'a.png' is relative")):
        pairs_table([{**row, "source_uri": "a.png"}], "mine")
    with pytest.raises(PairsError, match=re.escape("unknown fields ['points']")):
        pairs_table([{**row, "points": []}], "mine")
    expected = "row 1, pair 'x': duplicate pair id, first at pairs of 'mine', row 0"
    with pytest.raises(PairsError, match=re.escape(expected)):
        pairs_table([row, row], "mine")
