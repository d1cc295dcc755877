"""`m2fp-prelabel export`: Label Studio annotations -> CIHP layout and COCO.

Pure parts (rasterisation, brush decoding, label mapping, persons, overlaps, selection) are checked directly; the
round trip runs against a REAL Label Studio 1.23.2: the engine's (random-weight) parsing becomes a prediction, the
prediction is copied into an annotation, the annotation is edited through LS's API (a region moved, one deleted,
one drawn by hand without `meta.person`, one with a label the config lacks), then exported in both formats.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from backend.batch.cli import main as cli_main
from backend.export.brush import BrushError, decode_brush
from backend.export.compose import compose
from backend.export.labels import PERSON, LabelLookupError, build_class_map
from backend.export.raster import EVENODD, NONZERO, Patch, fill_polygon, polygon_mask
from backend.export.regions import Region, read_regions
from backend.export.source import Selection, choose
from backend.geometry import bridge_holes, trace_components
from backend.ls_config import parse_label_config
from backend.ls_results import brush_rle, make_prediction
from backend.settings import get_settings
from testing.label_studio import LabelStudioServer, create_project, import_tasks, import_uploads, predictions_of
from testing.raster import iou, rasterise_percent

PARTS = ["Hat", "Hair", "Glove", "Sunglasses", "UpperClothes", "Dress", "Coat", "Socks", "Pants", "Torso-skin",
         "Scarf", "Skirt", "Face", "Left-arm", "Right-arm", "Left-leg", "Right-leg", "Left-shoe", "Right-shoe"]


def _config(tag: str, extra: str = "") -> str:
    labels = "".join(f'<Label value="{n}"/>' for n in PARTS + ["Human"]) + extra
    return f'<View><Image name="image" value="$image"/><{tag} name="parts" toName="image">{labels}</{tag}></View>'


POLYGONS = _config("PolygonLabels")
BRUSH = _config("BrushLabels")


def _patch(mask: np.ndarray) -> Patch:
    return Patch.from_full(mask)


def _region(order: int, cls: int | None, mask: np.ndarray, person: int | None = None) -> Region:
    return Region(f"r{order}", order, cls, _patch(mask), person)


# ---------------------------------------------------------------- pure parts


def test_exact_rings_with_slit_holes_fill_back_to_their_component_under_both_rules() -> None:
    import cv2

    rng = np.random.default_rng(3)
    with_holes = 0
    for _ in range(30):
        mask = cv2.resize(rng.random((7, 7)).astype(np.float32), (90, 70)) > 0.45
        count, labels = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)
        components = [labels == k for k in range(1, count)]
        for comp in trace_components(mask):
            ring = bridge_holes(comp.outer, comp.holes) if comp.holes else comp.outer
            fills = [fill_polygon(ring, 90, 70, rule).full(90, 70) for rule in (NONZERO, EVENODD)]
            assert np.array_equal(fills[0], fills[1])
            assert any(np.array_equal(fills[0], c) for c in components)
            with_holes += bool(comp.holes)
    assert with_holes > 0


def test_self_overlapping_polygon_differs_between_rules_and_nonzero_keeps_the_overlap() -> None:
    # Two laps of the same square (what an annotator can drag a polygon into): non-zero fills it, even-odd not.
    lap = [[10, 10], [50, 10], [50, 50], [10, 50]]
    points = lap + lap
    nonzero = polygon_mask(points, 100, 100, NONZERO).full(100, 100)
    evenodd = polygon_mask(points, 100, 100, EVENODD).full(100, 100)
    assert nonzero[10:50, 10:50].all() and nonzero.sum() == 1600
    assert not evenodd.any()


def test_polygon_pixels_match_the_independent_rasteriser() -> None:
    rng = np.random.default_rng(5)
    for _ in range(20):
        pts = rng.uniform(0, 100, (int(rng.integers(3, 12)), 2)).round(3).tolist()
        ours = polygon_mask(pts, 97, 61).full(97, 61)
        assert np.array_equal(ours, rasterise_percent(pts, 97, 61))


def test_brush_rle_decodes_to_the_encoded_mask_and_a_wrong_size_is_refused() -> None:
    rng = np.random.default_rng(0)
    mask = rng.random((30, 40)) > 0.7
    rle = brush_rle(mask)
    assert np.array_equal(decode_brush(rle, 40, 30), mask)
    with pytest.raises(BrushError, match="40x31"):
        decode_brush(rle, 40, 31)
    with pytest.raises(BrushError):
        decode_brush([], 40, 30)


def test_class_map_inverts_the_backend_label_matching() -> None:
    config = ('<View><Image name="image" value="$image"/><PolygonLabels name="p" toName="image">'
              '<Label value="upper-clothes"/><Label value="Arms" predicted_values="Left-arm,Right-arm"/>'
              '<Label value="Necklace"/><Label value="Person"/></PolygonLabels></View>')
    model = build_class_map(config, get_settings())
    assert model.classes[0] == "Background" and model.classes[5] == "UpperClothes"
    assert model.lookup("p", "upper-clothes") == 5
    assert model.lookup("p", "Person") == PERSON
    assert model.image_key == "image"
    for label, reason in (("Arms", "ambiguous_label"), ("Necklace", "unmapped_label"), ("Nope", "unknown_label")):
        with pytest.raises(LabelLookupError) as err:
            model.lookup("p", label)
        assert err.value.reason == reason
    with pytest.raises(LabelLookupError) as err:
        model.lookup("other", "Hair")
    assert err.value.reason == "unknown_control"
    project = build_class_map(config, get_settings(), "project")
    assert project.classes == ("Background", "upper-clothes", "Arms", "Necklace")
    assert project.lookup("p", "Arms") == 2


def test_bad_regions_are_skipped_with_a_reason_and_the_rest_kept() -> None:
    cmap = build_class_map(POLYGONS, get_settings())
    good = {"id": "ok", "from_name": "parts", "type": "polygonlabels",
            "value": {"points": [[0, 0], [50, 0], [50, 50]], "polygonlabels": ["Hair"]}}
    result = [
        good,
        {**good, "id": "unknown", "value": {**good["value"], "polygonlabels": ["Necklace"]}},
        {**good, "id": "two", "value": {**good["value"], "polygonlabels": ["Hair", "Face"]}},
        {**good, "id": "short", "value": {"points": [[0, 0], [1, 1]], "polygonlabels": ["Hair"]}},
        {**good, "id": "nan", "value": {"points": [[0, 0], ["x", 1], [3, 3]], "polygonlabels": ["Hair"]}},
        {"id": "brush", "from_name": "parts", "type": "brushlabels", "original_width": 20, "original_height": 20,
         "value": {"format": "rle", "rle": brush_rle(np.ones((20, 20), bool)), "brushlabels": ["Face"]}},
        {"id": "c", "from_name": "quality", "type": "choices", "value": {"choices": ["good"]}},
    ]
    regions = read_regions(result, cmap, 10, 10, task_id=7, annotation_id=9)
    assert [r.id for r in regions.parts] == ["ok"]
    reasons = {s.region_id: s.reason for s in regions.skipped}
    assert reasons == {"unknown": "unknown_label", "two": "label_count", "short": "bad_geometry",
                       "nan": "bad_geometry", "brush": "bad_geometry"}
    assert regions.ignored == 1
    assert "task 7, annotation 9, region unknown: unknown_label" in regions.skipped[0].line()


def test_compose_smaller_part_wins_and_persons_follow_meta_then_overlap() -> None:
    h, w = 20, 20
    body_a = np.zeros((h, w), bool)
    body_a[:, :10] = True
    body_b = ~body_a
    coat = np.zeros((h, w), bool)
    coat[2:18, 2:18] = True           # big part across both bodies, meta says person 1 (body_b)
    hand = np.zeros((h, w), bool)
    hand[4:8, 3:7] = True             # small, drawn by hand, no meta: inside body_a
    parts = [_region(0, 3, hand), _region(1, 7, coat, person=1)]   # a glove, a coat
    persons = [_region(2, None, body_a, person=0), _region(3, None, body_b, person=1)]
    comp = compose(parts, persons, w, h)
    assert comp.category[5, 5] == 3 and comp.category[10, 10] == 7 and comp.category[0, 0] == 0
    ids = {p.meta: p.id for p in comp.persons}
    assert ids == {0: 1, 1: 2}
    assert comp.human[5, 5] == ids[0]         # the hand-drawn glove went to the body it lies in
    assert comp.human[10, 10] == ids[1]       # the coat keeps its meta.person
    assert comp.part_persons == (ids[0], ids[1])
    assert {(i.class_index, i.person) for i in comp.instances} == {(3, 1), (7, 2)}
    for inst in comp.instances:
        sel = comp.instance == inst.id
        assert set(np.unique(comp.category[sel])) == {inst.class_index}
    # No person region at all: a part without meta belongs to nobody; with a single person, to that one.
    alone = compose([_region(0, 3, hand)], [], w, h)
    assert alone.part_persons == (0,) and alone.human.max() == 0
    single = compose([_region(0, 3, hand)], [_region(1, None, body_b)], w, h)
    assert single.part_persons == (1,)


def test_selection_latest_all_reviewed_and_predictions() -> None:
    task = {"annotations": [
        {"id": 1, "updated_at": "2026-01-01T00:00:00Z", "result": [1]},
        {"id": 2, "updated_at": "2026-01-03T00:00:00Z", "result": [2], "was_cancelled": True},
        {"id": 3, "updated_at": "2026-01-02T00:00:00Z", "result": [3], "ground_truth": True},
        {"id": 4, "updated_at": "2026-01-01T12:00:00Z", "result": [4], "last_action": "fixed_and_accepted"}],
        "predictions": [{"id": 8, "model_version": "a", "created_at": "2026-01-05T00:00:00Z", "result": []},
                        {"id": 9, "model_version": "b", "created_at": "2026-01-04T00:00:00Z", "result": []}]}
    ids = lambda sel: [h["id"] for h in choose(task, sel)[0]]  # noqa: E731
    assert ids(Selection()) == [3]
    assert ids(Selection(annotations="all")) == [1, 4, 3]
    assert ids(Selection(annotations="all", only_reviewed=True)) == [4, 3]
    assert ids(Selection(predictions=True)) == [8]
    assert ids(Selection(predictions=True, model_version="b")) == [9]
    assert choose({"annotations": [{"id": 5, "was_cancelled": True}]}, Selection()) == ([], "no_annotation")
    assert choose({"annotations": [{"id": 5}]}, Selection(only_reviewed=True)) == ([], "not_reviewed")


# ---------------------------------------------------------------- round trip through a real Label Studio


@pytest.fixture(scope="module", autouse=True)
def export_model(model_dir: Path):
    """The export maps labels back to the classes of the model M2FP_MODEL names (its configuration.json):
    the in-process CLI reads the settings from the environment, so point them at the test model."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("M2FP_MODEL", str(model_dir))
        get_settings.cache_clear()
        yield
    get_settings.cache_clear()


def _export(ls: LabelStudioServer, project: int, fmt: str, out: Path, *extra: str) -> dict:
    code = cli_main(["export", str(project), "--format", fmt, "--out", str(out), "--ls-url", ls.url,
                     "--api-key", ls.token, "--val-fraction", "0", *extra])
    assert code == 0
    return json.loads((out / "export_summary.json").read_text())


def _read_png(path: Path) -> np.ndarray:
    return np.array(Image.open(path))


def _paint(masks: list[np.ndarray], values: list[int], shape: tuple[int, int]) -> np.ndarray:
    """The documented overlap rule, written out: larger first, later wins among equals."""
    out = np.zeros(shape, dtype=np.int64)
    for i in sorted(range(len(masks)), key=lambda i: (-int(masks[i].sum()), i)):
        out[masks[i]] = values[i]
    return out


@pytest.fixture(scope="module")
def scene(label_studio: LabelStudioServer, parser, sample_images: list[Path], tmp_path_factory) -> dict:
    ls = label_studio
    image_path = sample_images[0]
    with Image.open(image_path) as im:
        width, height = im.size
    parsing = parser(image_path)
    assert len(parsing.humans) >= 2, "the shaped random model should find several persons"
    out: dict = {"width": width, "height": height, "parsing": parsing, "root": tmp_path_factory.mktemp("export"),
                 "image_bytes": image_path.read_bytes()}
    settings = get_settings()
    for kind, config in (("polygons", POLYGONS), ("brush", BRUSH)):
        project = create_project(ls, config, title=f"export {kind}")
        (task,) = import_uploads(ls, project, [image_path])
        prediction = make_prediction(parsing, parse_label_config(config, settings, parser.classes),
                                     parser.version, config)
        ls.client.predictions.create(task=task, result=prediction["result"], score=prediction["score"],
                                     model_version=prediction["model_version"])
        stored = predictions_of(ls, task)[0]["result"]
        annotation = ls.client.annotations.create(id=task, result=stored)  # "accept the pre-labels"
        out[kind] = {"project": project, "task": task, "annotation": annotation.id, "prediction": stored}
    out["polygons"].update(_edit_polygons(ls, out, width, height))
    return out


def _edit_polygons(ls: LabelStudioServer, scene: dict, width: int, height: int) -> dict:
    info = scene["polygons"]
    result = [dict(r) for r in info["prediction"]]
    label = lambda r: r["value"]["polygonlabels"][0]  # noqa: E731
    masks = {r["id"]: rasterise_percent(r["value"]["points"], width, height) for r in result}
    parts = [r for r in result if label(r) != "Human"]

    def same_class_union(r: dict, among: list[dict]) -> np.ndarray:
        out = np.zeros((height, width), bool)
        for o in among:
            if o is not r and label(o) == label(r):
                out |= masks[o["id"]]
        return out

    # Moved: a mid-sized part with a person, shifted 12 px right.
    dx = 12 * 100.0 / width
    movable = [r for r in parts if "meta" in r and max(p[0] for p in r["value"]["points"]) + dx < 100
               and 200 < masks[r["id"]].sum() < 0.2 * width * height]
    moved = movable[len(movable) // 2]
    moved_from = masks[moved["id"]]
    moved["value"] = {**moved["value"], "points": [[round(x + dx, 3), y] for x, y in moved["value"]["points"]]}
    masks[moved["id"]] = rasterise_percent(moved["value"]["points"], width, height)

    # Deleted: the part with the most pixels no other part of its class covers.
    others = [r for r in parts if r is not moved]
    deleted = max(others, key=lambda r: int((masks[r["id"]] & ~same_class_union(r, parts)).sum()))
    result = [r for r in result if r is not deleted]
    remaining = [r for r in parts if r is not deleted]

    # Hand-drawn: a 10x10 px "Glove" with no meta, inside exactly one person's regions.
    person_masks: dict[int, np.ndarray] = {}
    for r in result:
        if label(r) == "Human":
            k = r["meta"]["person"]
            person_masks[k] = person_masks.get(k, np.zeros((height, width), bool)) | masks[r["id"]]
    owner, spot = None, None
    for y in range(0, height - 10, 5):
        for x in range(0, width - 10, 5):
            covering = [k for k, m in person_masks.items() if m[y:y + 10, x:x + 10].any()]
            if len(covering) == 1 and person_masks[covering[0]][y:y + 10, x:x + 10].all():
                owner, spot = covering[0], (x, y)
                break
        if spot:
            break
    assert spot is not None, "no 10x10 spot inside exactly one person"
    x, y = spot
    square = [[round(px * 100.0 / width, 3), round(py * 100.0 / height, 3)]
              for px, py in ((x, y), (x + 10, y), (x + 10, y + 10), (x, y + 10))]
    hand = {"id": "hand1", "from_name": "parts", "to_name": "image", "type": "polygonlabels",
            "original_width": width, "original_height": height, "image_rotation": 0,
            "value": {"points": square, "closed": True, "polygonlabels": ["Glove"]}}
    bogus = {**hand, "id": "bogus1", "value": {**hand["value"], "polygonlabels": ["Necklace"]}}
    ls.client.annotations.update(id=info["annotation"], result=result + [hand, bogus])
    # A second task whose image is gone: it must cost that task only.
    (broken,) = import_tasks(ls, info["project"], [{"image": f"/data/upload/{info['project']}/gone.jpg"}])
    ls.client.annotations.create(id=broken, result=[hand])
    import_tasks(ls, info["project"], [{"image": "/data/upload/x/unlabelled.jpg"}])
    return {"moved": moved["id"],
            "moved_away": moved_from & ~masks[moved["id"]] & ~same_class_union(moved, remaining),
            "deleted": deleted["id"], "deleted_label": label(deleted),
            "deleted_gone": masks[deleted["id"]] & ~same_class_union(deleted, remaining),
            "hand_owner": owner, "hand_spot": spot, "broken": broken}


@pytest.fixture(scope="module")
def polygon_exports(label_studio: LabelStudioServer, scene: dict) -> dict:
    root = scene["root"]
    project = scene["polygons"]["project"]
    return {"cihp": _export(label_studio, project, "cihp", root / "poly-cihp"),
            "coco": _export(label_studio, project, "coco", root / "poly-coco"),
            "final": label_studio.client.annotations.get(id=scene["polygons"]["annotation"]).result}


def test_polygon_export_matches_what_label_studio_draws(scene: dict, polygon_exports: dict) -> None:
    w, h = scene["width"], scene["height"]
    info = scene["polygons"]
    root = scene["root"] / "poly-cihp"
    classes = [line.split(" ", 1)[1] for line in (root / "classes.txt").read_text().splitlines()]
    final = [r for r in polygon_exports["final"] if r["value"]["polygonlabels"][0] not in ("Human", "Necklace")]
    masks = [rasterise_percent(r["value"]["points"], w, h) for r in final]
    expected = _paint(masks, [classes.index(r["value"]["polygonlabels"][0]) for r in final], (h, w))
    name = f"{info['task']:07d}"
    category = _read_png(root / "Training" / "Category_ids" / f"{name}.png")
    assert category.shape == (h, w)
    for c in np.unique(expected):
        assert iou(category == c, expected == c) >= 0.999, classes[c]
    # Each region on its own, as the export reads it, against the independent rasteriser.
    cmap = build_class_map(POLYGONS, get_settings())
    regions = read_regions(polygon_exports["final"], cmap, w, h)
    for region, item in zip(regions.parts, [r for r in polygon_exports["final"]
                                            if r["value"]["polygonlabels"][0] not in ("Human", "Necklace")]):
        assert region.id == item["id"]
        assert iou(region.patch.full(w, h), rasterise_percent(item["value"]["points"], w, h)) >= 0.999

    # The edits show: the moved region is where it was moved to, the deleted one is gone.
    moved = next(r for r in final if r["id"] == info["moved"])
    moved_mask = masks[final.index(moved)]
    smaller = np.logical_or.reduce([m for m in masks if m.sum() < moved_mask.sum()] + [np.zeros((h, w), bool)])
    visible = moved_mask & ~smaller
    assert visible.sum() > 0
    assert (category[visible] == classes.index(moved["value"]["polygonlabels"][0])).all()
    cls = classes.index(moved["value"]["polygonlabels"][0])
    away = info["moved_away"] & ~masks[-1]
    assert away.sum() > 0 and (category[away] != cls).all()
    gone = info["deleted_gone"] & ~masks[-1]               # the hand-drawn glove may cover a few of them
    assert gone.sum() > 0 and (category[gone] != classes.index(info["deleted_label"])).all()
    assert info["deleted"] not in {r["id"] for r in final}
    # The image itself: the uploaded JPEG, copied as is.
    assert (root / "Training" / "Images" / f"{name}.jpg").read_bytes() == scene["image_bytes"]
    assert (root / "Training" / "train_id.txt").read_text().split() == [name]


def test_hand_drawn_region_goes_to_the_person_it_lies_in(scene: dict, polygon_exports: dict) -> None:
    info = scene["polygons"]
    name = f"{info['task']:07d}"
    root = scene["root"] / "poly-cihp" / "Training"
    human = _read_png(root / "Human_ids" / f"{name}.png")
    category = _read_png(root / "Category_ids" / f"{name}.png")
    x, y = info["hand_spot"]
    metas = sorted({r["meta"]["person"] for r in polygon_exports["final"]
                    if r["value"]["polygonlabels"][0] == "Human"})
    expected_id = metas.index(info["hand_owner"]) + 1       # persons with meta.person are numbered in its order
    assert (category[y:y + 10, x:x + 10] == 3).all()        # Glove: the smallest region wins its pixels
    assert (human[y:y + 10, x:x + 10] == expected_id).all()
    # The same in COCO: the Glove annotation of that person holds the square.
    from pycocotools import mask as mask_utils
    coco = json.loads((scene["root"] / "poly-coco" / "annotations" / "instances_train.json").read_text())
    gloves = [a for a in coco["annotations"] if a["category_id"] == 3 and a["person_id"] == expected_id]
    assert len(gloves) == 1
    assert mask_utils.decode(gloves[0]["segmentation"])[y:y + 10, x:x + 10].all()


def test_bad_data_is_reported_and_skipped(scene: dict, polygon_exports: dict) -> None:
    for fmt in ("cihp", "coco"):
        summary = polygon_exports[fmt]
        assert summary["samples"] == 1
        skipped = {(s["task_id"], s["region_id"]): s["reason"] for s in summary["skipped"]}
        assert skipped[(scene["polygons"]["task"], "bogus1")] == "unknown_label"
        assert skipped[(scene["polygons"]["broken"], None)].startswith("image_")
        assert summary["tasks_without_labels"] == {"no_annotation": 1}


def test_coco_file_loads_in_pycocotools_and_agrees_with_the_cihp_maps(scene: dict, polygon_exports: dict) -> None:
    from pycocotools import mask as mask_utils
    from pycocotools.coco import COCO

    info = scene["polygons"]
    name = f"{info['task']:07d}"
    coco = COCO(str(scene["root"] / "poly-coco" / "annotations" / "instances_train.json"))
    (image_id,) = coco.getImgIds()
    meta = coco.loadImgs(image_id)[0]
    assert (meta["width"], meta["height"], meta["ls_task_id"]) == (scene["width"], scene["height"], info["task"])
    assert (scene["root"] / "poly-coco" / "images" / meta["file_name"]).exists()
    cihp = scene["root"] / "poly-cihp" / "Training"
    category = _read_png(cihp / "Category_ids" / f"{name}.png")
    human = _read_png(cihp / "Human_ids" / f"{name}.png")
    human_cat = next(c["id"] for c in coco.loadCats(coco.getCatIds()) if c["name"] == "Human")
    anns = coco.loadAnns(coco.getAnnIds(imgIds=[image_id]))
    assert anns
    rebuilt = np.zeros_like(category)
    for ann in anns:
        mask = coco.annToMask(ann).astype(bool)
        assert mask.shape == category.shape and mask.any()
        assert mask.sum() == ann["area"] and ann["iscrowd"] == 0
        assert np.array_equal(mask_utils.decode(ann["segmentation"]).astype(bool), mask)
        if ann["category_id"] == human_cat:
            continue
        assert (category[mask] == ann["category_id"]).all()
        assert (human[mask] == (ann["person_id"] or 0)).all()
        assert not rebuilt[mask].any()                   # one annotation per person-part: no overlaps
        rebuilt[mask] = ann["category_id"]
    assert np.array_equal(rebuilt, category)


def test_brush_export_equals_the_engine_masks_exactly(label_studio: LabelStudioServer, scene: dict) -> None:
    w, h = scene["width"], scene["height"]
    info = scene["brush"]
    parsing = scene["parsing"]
    root = scene["root"]
    _export(label_studio, info["project"], "cihp", root / "brush-cihp")
    predicted = _export(label_studio, info["project"], "cihp", root / "brush-pred", "--predictions")
    assert predicted["samples"] == 1 and not predicted["skipped"]
    classes = [line.split(" ", 1)[1] for line in (root / "brush-cihp" / "classes.txt").read_text().splitlines()]
    # The regions the prediction carried, mapped back to the engine's instances through their ids (c0_p<i>).
    regions = info["prediction"]
    part_masks, part_classes, part_metas = [], [], []
    cmap = build_class_map(BRUSH, get_settings())
    decoded = read_regions(regions, cmap, w, h)
    assert not decoded.skipped
    by_id = {r.id: r for r in decoded.parts + decoded.persons}
    for region in regions:
        kind, index = region["id"].split("_")[1][0], int(region["id"].split("_")[1][1:])
        inst = (parsing.humans if kind == "h" else parsing.parts)[index]
        assert np.array_equal(by_id[region["id"]].patch.full(w, h), inst.mask)   # bit for bit
        if kind == "p":
            part_masks.append(inst.mask)
            part_classes.append(classes.index(inst.label))
            part_metas.append(-1 if inst.person is None else inst.person)
    expected = _paint(part_masks, part_classes, (h, w))
    name = f"{info['task']:07d}"
    for folder in ("brush-cihp", "brush-pred"):
        category = _read_png(root / folder / "Training" / "Category_ids" / f"{name}.png")
        assert np.array_equal(category, expected)
    # Persons: on pixels whose part carried a meta.person, exported ids and engine persons correspond one to one.
    metas = _paint(part_masks, part_metas, (h, w))
    human = _read_png(root / "brush-cihp" / "Training" / "Human_ids" / f"{name}.png")
    sel = (category > 0) & (metas >= 0)
    pairs = set(zip(metas[sel].tolist(), human[sel].tolist()))
    assert len({m for m, _ in pairs}) == len(pairs) == len({p for _, p in pairs})
    assert all(p > 0 for _, p in pairs)


def test_usage_errors_exit_2_with_one_line(label_studio: LabelStudioServer, scene: dict, tmp_path: Path,
                                           capsys: pytest.CaptureFixture) -> None:
    ls = label_studio
    base = ["export", "--format", "coco", "--ls-url", ls.url, "--api-key", ls.token]
    assert cli_main([*base[:1], "999999", *base[1:], "--out", str(tmp_path / "a")]) == 2
    assert "cannot read project 999999" in capsys.readouterr().err
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "notes.txt").write_text("mine")
    project = str(scene["brush"]["project"])
    assert cli_main([*base[:1], project, *base[1:], "--out", str(tmp_path / "b"), "--overwrite"]) == 2
    assert "refusing to overwrite" in capsys.readouterr().err
    assert (tmp_path / "b" / "notes.txt").read_text() == "mine"
