"""The CIHP layout (instance-level human parsing), as human-parsing training code reads it:

    OUT/Training/Images/<id>.jpg          the photo, oriented as Label Studio shows it
    OUT/Training/Category_ids/<id>.png    class index per pixel (classes.txt order, 0 = background)
    OUT/Training/Human_ids/<id>.png       person id per pixel (1..N, 0 = background)
    OUT/Training/Instance_ids/<id>.png    part-instance id per pixel (1..K: one per person and class)
    OUT/Training/Instance_ids/<id>.txt    `instance class person` per line for those ids
    OUT/Training/train_id.txt             the ids of the split, one per line
    OUT/Validation/...                    the same for the validation split (val_id.txt)
    OUT/classes.txt, classes.json, palette.txt
"""
from __future__ import annotations

from pathlib import Path

from PIL import Image

from backend.export import files
from backend.export.compose import Composition

SPLIT_DIRS = {"train": ("Training", "train_id.txt"), "val": ("Validation", "val_id.txt")}


class CihpWriter:
    def __init__(self, out_dir: Path, classes: tuple[str, ...]) -> None:
        self.out_dir = Path(out_dir)
        self.classes = classes
        self.ids: dict[str, list[str]] = {split: [] for split in SPLIT_DIRS}

    def add(self, name: str, split: str, data: bytes, image: Image.Image, comp: Composition, **_) -> None:
        root = self.out_dir / SPLIT_DIRS[split][0]
        files.save_image(data, image, root / "Images" / f"{name}{files.image_suffix()}")
        files.save_index_png(comp.category, root / "Category_ids" / f"{name}.png")
        files.save_index_png(comp.human, root / "Human_ids" / f"{name}.png")
        files.save_index_png(comp.instance, root / "Instance_ids" / f"{name}.png")
        files.write_text(root / "Instance_ids" / f"{name}.txt",
                         "".join(f"{i.id} {i.class_index} {i.person}\n" for i in comp.instances))
        self.ids[split].append(name)

    def finish(self) -> list[Path]:
        written = []
        for split, (folder, list_name) in SPLIT_DIRS.items():
            if self.ids[split] or split == "train":
                path = self.out_dir / folder / list_name
                files.write_text(path, "".join(f"{n}\n" for n in sorted(self.ids[split])))
                written.append(path)
        files.write_class_files(self.out_dir, self.classes)
        return written
