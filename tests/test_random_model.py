"""testing/random_model.py: the hub's exact folder format, full size, and outputs that prove something."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from testing.random_model import CONFIG_FILE, WEIGHTS_FILE, default_config_path, model_key

FULL_SIZE_PARAMS = 63_124_118   # the hub architecture (facts file); running stats are buffers, not counted


def test_folder_is_in_the_hub_format(model_dir: Path) -> None:
    assert sorted(p.name for p in model_dir.iterdir()) == [CONFIG_FILE, WEIGHTS_FILE]
    assert json.loads((model_dir / CONFIG_FILE).read_text()) == json.loads(default_config_path().read_text())
    blob = torch.load(model_dir / WEIGHTS_FILE, map_location="cpu", weights_only=True)
    assert list(blob) == ["model"]
    state = blob["model"]
    params = sum(v.numel() for k, v in state.items() if not k.endswith(("running_mean", "running_var",
                                                                        "num_batches_tracked")))
    assert params == FULL_SIZE_PARAMS
    assert all(torch.isfinite(v.float()).all() for v in state.values())


def test_loads_strictly_into_the_engine_network(model_dir: Path, plain_model_dir: Path) -> None:
    from backend.engine.config import load_config
    from backend.engine.network import build_network, load_weights

    for folder in (model_dir, plain_model_dir):
        net = build_network(load_config(folder))
        load_weights(net, folder / WEIGHTS_FILE)   # raises on any missing/unexpected/mis-shaped key


def test_shaped_model_output_is_varied(parser, sample_images: list[Path]) -> None:
    """Several people, many labels, several instances of a label, small and large masks - on every image."""
    for path in sample_images:
        parsing = parser(Image.open(path))
        labels = [p.label for p in parsing.parts]
        fractions = [p.area / (parsing.width * parsing.height) for p in parsing.parts + parsing.humans]
        assert len(parsing.humans) >= 2, path.name
        assert len(parsing.parts) >= 8, path.name
        assert len(set(labels)) >= 5, path.name
        assert max(labels.count(x) for x in set(labels)) >= 2, path.name
        assert min(fractions) < 0.01 and max(fractions) > 0.1, (path.name, fractions)
        assert len({round(p.score, 3) for p in parsing.parts}) >= len(parsing.parts) // 2
        assert all(p.mask.shape == (parsing.height, parsing.width) and p.mask.any() for p in parsing.parts)


def test_shaped_masks_follow_the_image(parser, sample_images: list[Path]) -> None:
    """The same model on two different images draws different masks: they come from the pixels, not biases."""
    a = parser(Image.open(sample_images[0]))
    flipped = np.ascontiguousarray(np.asarray(Image.open(sample_images[0]).convert("RGB"))[:, ::-1])
    b = parser(flipped)
    humans_a = sorted(h.area for h in a.humans)
    assert humans_a
    ious = []
    for h in a.humans:
        best = max((np.logical_and(h.mask, g.mask).sum() / np.logical_or(h.mask, g.mask).sum() for g in b.humans),
                   default=0.0)
        ious.append(best)
    assert min(ious) < 0.9   # a mirrored scene does not give the same human masks


def test_plain_model_finds_nobody(plain_model_dir: Path, sample_images: list[Path]) -> None:
    from backend.engine import HumanParser

    plain = HumanParser.from_pretrained(plain_model_dir, device="cpu")
    parsing = plain(Image.open(sample_images[0]))
    assert parsing.is_empty
    assert (parsing.width, parsing.height) == Image.open(sample_images[0]).size


def test_cache_key_depends_on_variant_and_seed() -> None:
    keys = {model_key("shaped", 0), model_key("plain", 0), model_key("shaped", 1)}
    assert len(keys) == 3
    assert model_key("shaped", 0) == model_key("shaped", 0)
    assert model_key("shaped", 0).startswith("shaped-")
