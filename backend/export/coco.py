"""COCO instance segmentation, loadable by `pycocotools.coco.COCO`:

    OUT/images/<id>.jpg
    OUT/annotations/instances_train.json, instances_val.json

Categories: the part classes (ids = class indices of classes.txt, background left out) and one person category
(`Human`, id = number of classes). One annotation per person-part (the pixels of one class that belong to one
person, after the overlap rule of compose.py, so the COCO masks and the CIHP maps agree pixel for pixel), with
`person_id` (1..N within the image, the Human_ids value; null when no person claims the part); one `Human`
annotation per person (its own regions, or the union of its parts when it has none). Segmentations are RLE
(`{"size": [h, w], "counts": str}`), `iscrowd` 0. Images carry `ls_task_id` and `ls_source_id`.
"""
from __future__ import annotations

import datetime
from pathlib import Path

import numpy as np
from PIL import Image

from backend.export import files
from backend.export.compose import Composition

PERSON_CATEGORY = "Human"


def _rle(mask_fortran: np.ndarray) -> tuple[dict, float, list[float]]:
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(mask_fortran)
    area = float(mask_utils.area(rle))
    bbox = [float(v) for v in mask_utils.toBbox(rle)]
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}, area, bbox


class CocoWriter:
    def __init__(self, out_dir: Path, classes: tuple[str, ...]) -> None:
        self.out_dir = Path(out_dir)
        self.classes = classes
        self.person_category = len(classes)
        self.images: dict[str, list[dict]] = {"train": [], "val": []}
        self.annotations: dict[str, list[dict]] = {"train": [], "val": []}
        self._image_id = 0
        self._ann_id = 0

    def _annotation(self, split: str, image_id: int, category: int, mask_t: np.ndarray, person: int | None) -> None:
        # mask_t is the transposed (W, H) C-ordered mask: its .T is the Fortran-ordered (H, W) pycocotools wants.
        segmentation, area, bbox = _rle(np.asfortranarray(mask_t.T.astype(np.uint8, copy=False)))
        if area == 0:
            return
        self._ann_id += 1
        self.annotations[split].append({
            "id": self._ann_id, "image_id": image_id, "category_id": int(category), "segmentation": segmentation,
            "area": area, "bbox": bbox, "iscrowd": 0, "person_id": person})

    def add(self, name: str, split: str, data: bytes, image: Image.Image, comp: Composition,
            task_id: int | None = None, source_id: int | None = None) -> None:
        file_name = f"{name}{files.image_suffix()}"
        files.save_image(data, image, self.out_dir / "images" / file_name)
        self._image_id += 1
        image_id = self._image_id
        self.images[split].append({"id": image_id, "file_name": file_name, "width": comp.width,
                                   "height": comp.height, "ls_task_id": task_id, "ls_source_id": source_id})
        instance_t = np.ascontiguousarray(comp.instance.T)
        for inst in comp.instances:
            self._annotation(split, image_id, inst.class_index, instance_t == inst.id, inst.person or None)
        human_t = np.ascontiguousarray(comp.human.T) if comp.persons else None
        for person in comp.persons:
            if person.patch is not None:
                mask_t = np.ascontiguousarray(person.patch.full(comp.width, comp.height).T)
            else:
                mask_t = human_t == person.id
            self._annotation(split, image_id, self.person_category, mask_t, person.id)

    def finish(self) -> list[Path]:
        categories = [{"id": i, "name": name, "supercategory": "part"} for i, name in enumerate(self.classes) if i]
        categories.append({"id": self.person_category, "name": PERSON_CATEGORY, "supercategory": "person"})
        info = {"description": "Label Studio annotations exported by m2fp-prelabel",
                "date_created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        written = []
        for split in ("train", "val"):
            if not self.images[split] and split == "val":
                continue
            path = self.out_dir / "annotations" / f"instances_{split}.json"
            files.write_json(path, {"info": info, "images": self.images[split],
                                    "annotations": self.annotations[split], "categories": categories})
            written.append(path)
        files.write_class_files(self.out_dir, self.classes)
        return written
