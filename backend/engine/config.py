"""The model folder's configuration.json, read into one typed, validated ModelConfig.

Every architectural number and every output-relevant parameter comes from here, so a folder with a
different class list, depth or threshold builds a different network instead of silently mis-loading.
Preprocessing sizes and the part/human score cut-offs are defaults of modelscope's pipeline and
M2FP post-processing, not of configuration.json; they are fields here (with those defaults) so they
are explicit, overridable (optional keys in the "model" section) and part of the parser fingerprint.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

CONFIG_FILE = "configuration.json"


class ConfigError(ValueError):
    """configuration.json is missing, malformed, or describes something this engine does not support."""


@dataclass(frozen=True)
class BackboneConfig:
    depth: int = 101
    out_features: tuple[str, ...] = ("res2", "res3", "res4", "res5")
    num_groups: int = 1
    width_per_group: int = 64
    norm: str = "BN"
    stem_out_channels: int = 128
    res2_out_channels: int = 256
    stride_in_1x1: bool = False
    res4_dilation: int = 1
    res5_dilation: int = 1
    res5_multi_grid: tuple[int, ...] = (1, 1, 1)


@dataclass(frozen=True)
class EncoderConfig:
    in_features: tuple[str, ...] = ("res2", "res3", "res4", "res5")
    transformer_dropout: float = 0.0
    transformer_nheads: int = 8
    transformer_dim_feedforward: int = 1024
    transformer_enc_layers: int = 6
    conv_dim: int = 256
    mask_dim: int = 256
    transformer_in_features: tuple[str, ...] = ("res3", "res4", "res5")
    common_stride: int = 4
    # Fixed in modelscope's MSDeformAttnTransformerEncoderOnly (not read from the config there either).
    n_points: int = 4


@dataclass(frozen=True)
class DecoderConfig:
    num_classes: int = 21
    hidden_dim: int = 256
    num_queries: int = 100
    nheads: int = 8
    dim_feedforward: int = 2048
    dec_layers: int = 9
    pre_norm: bool = False
    mask_dim: int = 256
    enforce_input_project: bool = False


@dataclass(frozen=True)
class ModelConfig:
    classes: tuple[str, ...]
    num_parsing: int
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    single_human: bool = False
    parsing_on: bool = True
    # Only used by modelscope for its semantic map (not part of the pipeline output); kept for the fingerprint.
    parsing_ins_score_thr: float = 0.5
    # Pipeline / post-processing defaults of the reference implementation.
    min_size: int = 640
    max_size: int = 1333
    size_divisibility: int = 32
    pixel_mean: tuple[float, float, float] = (123.675, 116.28, 103.53)
    pixel_std: tuple[float, float, float] = (58.395, 57.12, 57.375)
    test_topk_per_image: int = 100
    part_score_thr: float = 0.1    # parts kept when score >= this
    human_score_thr: float = 0.1   # humans kept when score > this
    model_type: str = "m2fp"

    @property
    def human_class_id(self) -> int:
        return self.num_parsing

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _section(cls: type, raw: Any, where: str) -> Any:
    if raw is None:
        return cls()
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be an object, got {type(raw).__name__}")
    known = {f for f in cls.__dataclass_fields__}
    values = {}
    for key, value in raw.items():
        if key not in known:
            # Unknown keys would be architecture we do not build: refuse rather than guess.
            raise ConfigError(f"{where}.{key} is not supported by this engine")
        default = getattr(cls(), key)
        if isinstance(default, tuple):
            value = tuple(value)
        values[key] = value
    return cls(**values)


def parse_config(raw: dict[str, Any]) -> ModelConfig:
    """Validate the parsed JSON of configuration.json and build a ModelConfig."""
    model = raw.get("model")
    if not isinstance(model, dict):
        raise ConfigError("configuration.json has no 'model' object")
    mtype = model.get("type", "m2fp")
    if str(mtype).lower() != "m2fp":
        raise ConfigError(f"model.type is {mtype!r}; this engine only runs 'm2fp'")
    classes = model.get("classes")
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
        raise ConfigError("model.classes must be a non-empty list of class names")
    backbone = _section(BackboneConfig, model.get("backbone"), "model.backbone")
    encoder = _section(EncoderConfig, model.get("encoder"), "model.encoder")
    decoder = _section(DecoderConfig, model.get("decoder"), "model.decoder")
    num_parsing = model.get("num_parsing", len(classes) - 1)
    if decoder.num_classes != len(classes):
        raise ConfigError(
            f"model.decoder.num_classes={decoder.num_classes} but model.classes has {len(classes)} names")
    if not isinstance(num_parsing, int) or not 0 < num_parsing < len(classes):
        raise ConfigError(f"model.num_parsing={num_parsing!r} must index the Human class in model.classes")
    single_human = bool(model.get("single_human", True))
    if single_human:
        raise ConfigError("single_human=true (single-person crop parsing) is not supported; "
                          "this engine runs the multiple-human model (single_human=false)")
    if not bool(model.get("parsing_on", False)):
        raise ConfigError("parsing_on=false (semantic-only output) is not supported; this engine returns instances")
    if backbone.norm not in ("BN", "GN"):
        raise ConfigError(f"model.backbone.norm={backbone.norm!r}: only 'BN' and 'GN' are supported")
    if backbone.depth not in (50, 101, 152):
        raise ConfigError(f"model.backbone.depth={backbone.depth}: only 50, 101, 152 exist")
    extras: dict[str, Any] = {}
    for key in ("parsing_ins_score_thr", "min_size", "max_size", "size_divisibility", "test_topk_per_image",
                "part_score_thr", "human_score_thr"):
        if key in model:
            extras[key] = model[key]
    for key in ("pixel_mean", "pixel_std"):
        if key in model:
            extras[key] = tuple(float(v) for v in model[key])
    return ModelConfig(classes=tuple(classes), num_parsing=num_parsing, backbone=backbone, encoder=encoder,
                       decoder=decoder, single_human=single_human, parsing_on=True, model_type=str(mtype),
                       **extras)


def load_config(model_dir: Path | str) -> ModelConfig:
    """Read `<model_dir>/configuration.json`; raises ConfigError naming what is wrong."""
    path = Path(model_dir) / CONFIG_FILE
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ConfigError(f"{path} does not exist") from exc
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path} cannot be read as JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a JSON object")
    return parse_config(raw)
