"""The native M2FP engine: strict loading, configuration, preprocessing, post-processing, model sources."""
from __future__ import annotations

import io
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from backend.engine import (ConfigError, HumanParser, InvalidImageError, ModelLoadError, ModelNotAvailableError,
                            Parsing, build_network, load_config)
from backend.engine.config import parse_config
from backend.engine.pixel_decoder import DeformTransformerEncoder, padded_value_table, sample_and_weight, sampling_grid
from backend.engine.postprocess import parse_outputs
from backend.engine.preprocess import load_rgb, prepare, resized_shape
from testing.random_model import make_sample_image
from testing.ports import free_port

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------ helpers

def _raw_config(model_dir: Path) -> dict:
    return json.loads((model_dir / "configuration.json").read_text())


def _folder_with(tmp: Path, raw: dict, weights: Path | None) -> Path:
    """A model folder with the given configuration and (a link to) existing weights."""
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "configuration.json").write_text(json.dumps(raw))
    if weights is not None:
        (tmp / "pytorch_model.pt").symlink_to(weights)
    return tmp


def _small_raw(model_dir: Path) -> dict:
    """A much smaller network of the same family (ResNet-50, 1 encoder layer, 3 decoder layers)."""
    raw = _raw_config(model_dir)
    raw["model"]["backbone"]["depth"] = 50
    raw["model"]["encoder"]["transformer_enc_layers"] = 1
    raw["model"]["decoder"]["dec_layers"] = 3
    raw["model"]["decoder"]["num_queries"] = 20
    return raw


def _check_parsing(parsing: Parsing, classes: tuple[str, ...], width: int, height: int) -> None:
    assert (parsing.width, parsing.height) == (width, height)
    for inst in parsing.parts + parsing.humans:
        assert inst.mask.dtype == np.bool_ and inst.mask.shape == (height, width)
        assert inst.label == classes[inst.class_id]
        assert 0.1 <= inst.score <= 1.0
    assert all(h.label == "Human" and h.person is None for h in parsing.humans)
    assert all(p.label not in ("Human", "Background") for p in parsing.parts)
    for group in (parsing.parts, parsing.humans):
        scores = [i.score for i in group]
        assert scores == sorted(scores, reverse=True)
    for part in parsing.parts:
        overlaps = [int((part.mask & h.mask).sum()) for h in parsing.humans]
        if part.person is None:
            assert not any(overlaps)
        else:
            assert 0 <= part.person < len(parsing.humans)
            assert overlaps[part.person] == max(overlaps) > 0


@pytest.fixture(scope="module")
def scene() -> Image.Image:
    return make_sample_image(640, 480, seed=3)


@pytest.fixture(scope="module")
def scene_parsing(parser: HumanParser, scene: Image.Image) -> Parsing:
    return parser(scene)


# ------------------------------------------------------------------------------------------------ network + loading

def test_state_dict_matches_hub_checkpoint_exactly(model_dir: Path) -> None:
    net = build_network(load_config(model_dir))
    ours = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    ckpt = torch.load(model_dir / "pytorch_model.pt", map_location="cpu", weights_only=True, mmap=True)["model"]
    assert ours == {k: tuple(v.shape) for k, v in ckpt.items()}
    assert "pixel_mean" not in ours and "pixel_std" not in ours     # non-persistent, as in modelscope
    assert sum(p.numel() for p in net.parameters()) == 63_124_118  # the facts file's count


@pytest.fixture(scope="module")
def small_state(model_dir: Path) -> tuple[dict, dict]:
    raw = _small_raw(model_dir)
    torch.manual_seed(0)
    return raw, build_network(parse_config(raw)).state_dict()


@pytest.mark.parametrize("defect", ["missing", "unexpected", "misshaped"])
def test_strict_loading_names_the_bad_key(tmp_path: Path, small_state: tuple[dict, dict], defect: str) -> None:
    raw, state = small_state
    state = dict(state)
    if defect == "missing":
        key = "sem_seg_head.predictor.class_embed.weight"
        del state[key]
    elif defect == "unexpected":
        key = "sem_seg_head.predictor.extra_head.weight"
        state[key] = torch.zeros(3)
    else:
        key = "backbone.res3.0.conv2.weight"
        state[key] = torch.zeros(1, 2, 3, 3)
    folder = _folder_with(tmp_path / "m", raw, None)
    torch.save({"model": state}, folder / "pytorch_model.pt")
    with pytest.raises(ModelLoadError, match=defect.replace("misshaped", "mis-shaped")) as err:
        HumanParser.from_pretrained(folder, device="cpu")
    assert key in str(err.value)
    assert isinstance(err.value, ValueError)


def test_checkpoint_not_in_hub_format_is_a_clear_error(tmp_path: Path, small_state: tuple[dict, dict]) -> None:
    raw, state = small_state
    folder = _folder_with(tmp_path / "m", raw, None)
    torch.save(state, folder / "pytorch_model.pt")          # bare state dict, no {'model': ...}
    with pytest.raises(ModelLoadError, match="'model'"):
        HumanParser.from_pretrained(folder, device="cpu")
    (folder / "pytorch_model.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ModelLoadError, match="not a readable"):
        HumanParser.from_pretrained(folder, device="cpu")


def test_folded_network_computes_what_the_loaded_one_does(small_state: tuple[dict, dict]) -> None:
    raw, state = small_state
    gen = torch.Generator().manual_seed(1)
    state = dict(state)
    for key in [k for k in state if k.endswith("running_var")]:   # BatchNorm far from identity
        base = key[: -len("running_var")]
        n = state[key].numel()
        state[key] = torch.rand(n, generator=gen) + 0.5
        state[base + "running_mean"] = torch.randn(n, generator=gen) * 0.1
        state[base + "weight"] = torch.rand(n, generator=gen) + 0.5
    plain = build_network(parse_config(raw))
    plain.load_state_dict(state, strict=True)
    plain.eval()
    folded = build_network(parse_config(raw))
    folded.load_state_dict(state, strict=True)
    folded.prepare_for_inference(fold_norms=True, channels_last=True)   # what the parser runs
    x = torch.randn(1, 3, 128, 160, generator=gen)
    with torch.inference_mode():
        a, b = plain(x), folded(x)
    assert torch.allclose(a[0], b[0], atol=1e-3) and torch.allclose(a[1], b[1], atol=1e-3)


def test_deformable_sampling_is_grid_sample() -> None:
    """The zero-bordered embedding-bag sampling equals modelscope's CPU path: grid_sample (bilinear, zeros,
    align_corners=False) per level and head, weighted and summed, including samples far outside the maps."""
    gen = torch.Generator().manual_seed(5)
    n, heads, dh, points = 2, 4, 8, 3
    shapes = [(3, 5), (6, 4), (7, 9)]
    s, levels = sum(h * w for h, w in shapes), len(shapes)
    value = torch.randn(n, s, heads * dh, generator=gen)
    grid = sampling_grid(shapes, n, heads, torch.device("cpu"))
    lq = s                                          # queries = every position, as in the encoder
    offsets = torch.randn(n, lq, heads, levels, points, 2, generator=gen) * 4   # many samples off the map
    weights = torch.rand(n, lq, heads, levels, points, generator=gen)
    out = sample_and_weight(padded_value_table(value, grid), grid, offsets, weights, heads)

    ref = DeformTransformerEncoder.reference_points(shapes, torch.device("cpu"))        # (1, S, L, 2) in [0, 1]
    normalizer = torch.tensor([[w, h] for h, w in shapes], dtype=torch.float32)
    loc = ref[:, :, None, :, None, :] + offsets / normalizer[None, None, None, :, None, :]
    expected = torch.zeros(n, lq, heads, dh)
    start = 0
    for lvl, (h, w) in enumerate(shapes):
        vmap = value[:, start:start + h * w].view(n, h, w, heads, dh).permute(0, 3, 4, 1, 2).reshape(n * heads, dh, h, w)
        g = (2 * loc[:, :, :, lvl] - 1).permute(0, 2, 1, 3, 4).reshape(n * heads, lq, points, 2)
        sampled = F.grid_sample(vmap, g, mode="bilinear", padding_mode="zeros", align_corners=False)
        wl = weights[:, :, :, lvl].permute(0, 2, 1, 3).reshape(n * heads, 1, lq, points)
        expected += (sampled * wl).sum(-1).view(n, heads, dh, lq).permute(0, 3, 1, 2)
        start += h * w
    assert (offsets.abs() > 8).any()
    assert torch.allclose(out, expected.reshape(n, lq, heads * dh), atol=1e-4)


# ------------------------------------------------------------------------------------------------ configuration

def test_config_is_read_from_the_folder(model_dir: Path) -> None:
    cfg = load_config(model_dir)
    raw = _raw_config(model_dir)["model"]
    assert list(cfg.classes) == raw["classes"] and cfg.num_parsing == raw["num_parsing"]
    assert cfg.decoder.num_queries == raw["decoder"]["num_queries"]
    assert cfg.backbone.depth == raw["backbone"]["depth"]
    assert cfg.parsing_ins_score_thr == raw["parsing_ins_score_thr"]
    assert (cfg.min_size, cfg.max_size, cfg.size_divisibility) == (640, 1333, 32)


@pytest.mark.parametrize("change, message", [
    (lambda m: m.__setitem__("single_human", True), "single_human"),
    (lambda m: m["classes"].pop(), "num_classes"),
    (lambda m: m["backbone"].__setitem__("depth", 34), "depth"),
    (lambda m: m["decoder"].__setitem__("unknown_knob", 1), "unknown_knob"),
    (lambda m: m.__setitem__("type", "mask-rcnn"), "m2fp"),
])
def test_unsupported_config_is_a_clear_error(model_dir: Path, change, message: str) -> None:
    raw = _raw_config(model_dir)
    change(raw["model"])
    with pytest.raises(ConfigError, match=message):
        parse_config(raw)


def test_config_changes_labels_and_filters(tmp_path: Path, model_dir: Path, scene: Image.Image,
                                           parser: HumanParser, scene_parsing: Parsing) -> None:
    assert len({p.label for p in scene_parsing.parts}) >= 3 and scene_parsing.humans
    raw = _raw_config(model_dir)
    raw["model"]["classes"] = [f"C{i}" for i in range(len(raw["model"]["classes"]) - 1)] + ["Person"]
    raw["model"]["part_score_thr"] = 0.5
    raw["model"]["human_score_thr"] = 0.5
    folder = _folder_with(tmp_path / "renamed", raw, model_dir / "pytorch_model.pt")
    other = HumanParser.from_pretrained(folder, device="cpu")
    parsing = other(scene)
    assert other.classes == tuple(raw["model"]["classes"])
    assert [p.class_id for p in parsing.parts] == [p.class_id for p in scene_parsing.parts if p.score >= 0.5]
    assert all(p.label == f"C{p.class_id}" for p in parsing.parts)
    assert [h.score for h in parsing.humans] == [h.score for h in scene_parsing.humans if h.score > 0.5]
    assert all(h.label == "Person" for h in parsing.humans)
    assert other.fingerprint != parser.fingerprint and other.weights_sha256 == parser.weights_sha256


# ------------------------------------------------------------------------------------------------ parsing

def test_parsing_is_well_formed(parser: HumanParser, scene_parsing: Parsing) -> None:
    _check_parsing(scene_parsing, parser.classes, 640, 480)
    assert len(scene_parsing.humans) >= 2 and len(scene_parsing.parts) >= 8
    assert any(p.person is not None for p in scene_parsing.parts)


def test_all_input_types_give_the_same_parsing(tmp_path: Path, parser: HumanParser, scene: Image.Image,
                                               scene_parsing: Parsing) -> None:
    path = tmp_path / "scene.png"
    scene.save(path)
    for image in (np.asarray(scene), str(path)):
        parsing = parser(image)
        assert [(i.label, i.score) for i in parsing.parts + parsing.humans] == \
               [(i.label, i.score) for i in scene_parsing.parts + scene_parsing.humans]
        assert all(np.array_equal(a.mask, b.mask) for a, b in zip(parsing.parts, scene_parsing.parts))


def test_exif_orientation_is_applied_first(parser: HumanParser) -> None:
    image = make_sample_image(400, 300, seed=7)
    exif = Image.Exif()
    exif[0x0112] = 6                                         # "rotate 90 CW to display"
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=95, exif=exif.tobytes())
    data = buf.getvalue()
    assert Image.open(io.BytesIO(data)).size == (400, 300)           # stored landscape, displayed portrait
    assert ImageOps.exif_transpose(Image.open(io.BytesIO(data))).size == (300, 400)
    parsing = parser(data)
    assert (parsing.width, parsing.height) == (300, 400)
    _check_parsing(parsing, parser.classes, 300, 400)
    assert not parsing.is_empty


def test_nobody_in_the_image_gives_an_empty_parsing(plain_model_dir: Path) -> None:
    parser = HumanParser.from_pretrained(plain_model_dir, device="cpu")
    parsing = parser(make_sample_image(320, 240, seed=1))
    assert parsing.is_empty and (parsing.width, parsing.height) == (320, 240)


def test_bad_image_input_is_a_clear_error(parser: HumanParser) -> None:
    with pytest.raises(InvalidImageError, match="cannot read image"):
        parser(b"definitely not an image")
    with pytest.raises(InvalidImageError, match="HxWx3"):
        parser(np.zeros((4, 4, 2), np.uint8))
    with pytest.raises(InvalidImageError, match="uint8"):
        parser(np.zeros((4, 4, 3), np.float32))


def test_product_parses_without_mmcv_torchvision_timm_or_modelscope(model_dir: Path, tmp_path: Path) -> None:
    image = tmp_path / "x.jpg"
    make_sample_image(320, 240, seed=2).save(image)
    code = (
        "import sys\n"
        "from backend.engine import HumanParser\n"
        f"p = HumanParser.from_pretrained({str(model_dir)!r}, device='cpu', threads=1)\n"
        f"r = p({str(image)!r})\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('mmcv', 'torchvision', 'timm', 'modelscope'))\n"
        "print('BAD', bad, 'PARTS', len(r.parts))\n"
        "sys.exit(1 if bad else 0)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "BAD []" in out.stdout


# ------------------------------------------------------------------------------------------------ preprocessing

@pytest.mark.parametrize("hw, expected", [((480, 640), (640, 853)), ((1080, 1920), (640, 1138)),
                                          ((800, 480), (1067, 640)), ((300, 3000), (133, 1333)),
                                          ((640, 640), (640, 640))])
def test_resized_shape_follows_the_pipeline(hw: tuple[int, int], expected: tuple[int, int]) -> None:
    assert resized_shape(*hw, 640, 1333) == expected


def test_prepare_normalises_then_pads_with_zeros() -> None:
    image = make_sample_image(500, 375, seed=4)
    prep = prepare(load_rgb(image), min_size=640, max_size=1333, size_divisibility=32,
                   mean=(123.675, 116.28, 103.53), std=(58.395, 57.12, 57.375))
    h, w = prep.resized
    assert (h, w) == (640, 853) and prep.tensor.shape == (1, 3, 640, 864)
    assert torch.count_nonzero(prep.tensor[..., w:]) == 0
    resized = np.asarray(image.resize((w, h), Image.BILINEAR), np.float32)
    expected = (resized - np.array([123.675, 116.28, 103.53])) / np.array([58.395, 57.12, 57.375])
    got = prep.tensor[0, :, :h, :w].permute(1, 2, 0).numpy()
    assert np.abs(got - expected).max() < 1e-5


# ------------------------------------------------------------------------------------------------ post-processing

def _reference_parsing(logits, masks, classes, num_parsing, padded, resized, original):
    """modelscope's algorithm as written there: every query upsampled, top-k over query x class."""
    up = F.interpolate(masks[None], size=padded, mode="bilinear", align_corners=False)[0]
    up = F.interpolate(up[None, :, :resized[0], :resized[1]], size=original, mode="bilinear",
                       align_corners=False)[0]
    scores = F.softmax(logits, -1)[:, :-1]
    c = scores.shape[1]
    top, idx = scores.flatten().topk(min(100, scores.numel()), sorted=False)
    labels, q = idx % c, idx // c
    m = up[q]
    fg = (m > 0).float().flatten(1)
    final = top * (m.sigmoid().flatten(1) * fg).sum(1) / (fg.sum(1) + 1e-6)
    parts, humans = [], []
    for lab, s, mm in zip(labels.tolist(), final.tolist(), m):
        if lab == num_parsing and s > 0.1:
            humans.append((classes[lab], s, (mm > 0).numpy()))
        elif lab not in (0, num_parsing) and s >= 0.1:
            parts.append((classes[lab], s, (mm > 0).numpy()))
    return sorted(parts, key=lambda t: -t[1]), sorted(humans, key=lambda t: -t[1])


def test_lean_postprocess_equals_the_reference_algorithm(model_dir: Path) -> None:
    cfg = load_config(model_dir)
    gen = torch.Generator().manual_seed(3)
    q, c = cfg.decoder.num_queries, len(cfg.classes)
    logits = torch.randn(q, c + 1, generator=gen) * 2
    logits[:30, -1] = -5
    logits[:30, torch.randint(1, c, (30,), generator=gen)] += 4     # confident queries of many labels
    logits[5, [2, 13]] = 6                                           # one query, two labels: both kept
    logits[7, 0] = 9                                                 # confident Background: never a part
    masks = torch.randn(q, 12, 17, generator=gen) * 3
    padded, resized, original = (48, 68), (45, 64), (183, 260)
    parsing = parse_outputs(logits, masks, cfg, padded=padded, resized=resized, original=original)
    ref_parts, ref_humans = _reference_parsing(logits, masks, cfg.classes, cfg.num_parsing, padded, resized,
                                               original)
    assert len(parsing.parts) >= 5 and {"Hair", "Face"} <= {p.label for p in parsing.parts}
    for ours, ref in ((parsing.parts, ref_parts), (parsing.humans, ref_humans)):
        assert [i.label for i in ours] == [r[0] for r in ref]
        assert np.allclose([i.score for i in ours], [r[1] for r in ref], atol=1e-6)
        assert all(np.array_equal(i.mask, r[2]) for i, r in zip(ours, ref))


def test_no_candidate_above_threshold_gives_empty_parsing(model_dir: Path) -> None:
    cfg = load_config(model_dir)
    logits = torch.zeros(cfg.decoder.num_queries, len(cfg.classes) + 1)
    logits[:, -1] = 10
    parsing = parse_outputs(logits, torch.ones(cfg.decoder.num_queries, 8, 8), cfg, padded=(32, 32),
                            resized=(30, 32), original=(90, 96))
    assert parsing.is_empty and (parsing.width, parsing.height) == (96, 90)


# ------------------------------------------------------------------------------------------------ model sources

def test_identity_of_a_local_folder(parser: HumanParser, model_dir: Path) -> None:
    assert parser.version.startswith(model_dir.name + "@") and len(parser.version.split("@")[1]) == 8
    assert parser.device == torch.device("cpu")
    assert len(parser.fingerprint) == 64


def test_missing_or_incomplete_folder_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ModelNotAvailableError, match="does not exist"):
        HumanParser.from_pretrained(tmp_path / "nowhere", device="cpu")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "configuration.json").write_text("{}")
    with pytest.raises(ModelNotAvailableError, match="pytorch_model.pt"):
        HumanParser.from_pretrained(tmp_path / "half", device="cpu")


@pytest.mark.parametrize("endpoint", ["refused", "silent"])
def test_unreachable_hub_fails_fast_and_says_what_to_do(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        endpoint: str) -> None:
    # refused: nothing listens on the port; silent: a server accepts connections but never answers.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1] if endpoint == "silent" else free_port()
        monkeypatch.setenv("MODELSCOPE_ENDPOINT", f"http://127.0.0.1:{port}")
        start = time.monotonic()
        with pytest.raises(ModelNotAvailableError) as err:
            HumanParser.from_pretrained("damo/cv_resnet101_image-multiple-human-parsing", revision="v1.0.1",
                                        cache_dir=tmp_path, device="cpu", connect_timeout=1.0)
        elapsed = time.monotonic() - start
    assert elapsed < 5
    message = str(err.value)
    assert "M2FP_MODEL" in message and "damo/cv_resnet101_image-multiple-human-parsing@v1.0.1" in message
    assert str(tmp_path) in message and "unreachable" in message
    assert not any(tmp_path.iterdir())                      # nothing half-downloaded left behind


def test_default_hub_unreachable_here_is_a_fast_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The product's real default endpoint; this machine (and CI) cannot reach it. A made-up id so that a
    # machine which can reach it gets a quick "not found" instead of a download.
    monkeypatch.delenv("MODELSCOPE_ENDPOINT", raising=False)
    monkeypatch.delenv("MODELSCOPE_DOMAIN", raising=False)
    start = time.monotonic()
    with pytest.raises(ModelNotAvailableError, match="M2FP_MODEL"):
        HumanParser.from_pretrained("m2fp-prelabel-tests/no-such-model", cache_dir=tmp_path, device="cpu",
                                    connect_timeout=3.0)
    assert time.monotonic() - start < 30


def test_cached_hub_id_loads_without_network(tmp_path: Path, model_dir: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODELSCOPE_ENDPOINT", f"http://127.0.0.1:{free_port()}")   # any network use fails
    folder = tmp_path / "damo" / "cv_resnet101_image-multiple-human-parsing" / "v1.0.1"
    _folder_with(folder, _raw_config(model_dir), model_dir / "pytorch_model.pt")
    parser = HumanParser.from_pretrained("damo/cv_resnet101_image-multiple-human-parsing", revision="v1.0.1",
                                         cache_dir=tmp_path, device="cpu")
    assert parser.version == "cv_resnet101_image-multiple-human-parsing@v1.0.1"
    assert parser.source.model_id == "damo/cv_resnet101_image-multiple-human-parsing"
    assert parser.source.path == folder.resolve()
    # Another revision is a different folder: not cached, so it needs the (unreachable) hub.
    with pytest.raises(ModelNotAvailableError):
        HumanParser.from_pretrained("damo/cv_resnet101_image-multiple-human-parsing", revision="v9",
                                    cache_dir=tmp_path, device="cpu", connect_timeout=1.0)


def test_device_and_threads_settings(model_dir: Path) -> None:
    before = torch.get_num_threads()
    try:
        auto = HumanParser.from_pretrained(model_dir, device="auto", threads=1)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    assert auto.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA"):
            HumanParser.from_pretrained(model_dir, device="cuda")
