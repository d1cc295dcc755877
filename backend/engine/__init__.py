"""Native M2FP human parsing in plain PyTorch (no mmcv, torchvision, timm or modelscope model code).

Public API::

    from backend.engine import HumanParser, Parsing, Instance

    parser = HumanParser.from_pretrained(
        "damo/cv_resnet101_image-multiple-human-parsing",  # ModelScope id, or a local model folder
        revision="v1.0.1",        # hub revision (pinned); ignored for a local folder
        device=None,              # None/"auto" -> cuda when available, else cpu; or "cpu", "cuda:0"
        threads=2,                # torch intra-op threads (None = torch default)
        cache_dir="~/.cache/m2fp", # hub downloads land in <cache_dir>/<owner>/<name>/<revision>/
    )
    parsing = parser(image)       # PIL.Image | np.ndarray (HxWx3 RGB uint8) | bytes | str/Path
    parsing.width, parsing.height # original size after EXIF orientation
    parsing.parts                 # list[Instance]: label, class_id, score, mask (bool HxW), person
    parsing.humans                # list[Instance] with label "Human"; parts[i].person indexes this list
    parser.classes                # class names from configuration.json
    parser.version                # "<model name>@<revision or weights sha256[:8]>" (Label Studio model_version)
    parser.fingerprint            # sha256 of engine version + model id/revision + weights hash + config

A model folder holds the hub's `configuration.json` and `pytorch_model.pt` (`{'model': state_dict}`).
Loading is strict: a missing, unexpected or mis-shaped key raises ModelLoadError naming the keys. A hub
id is downloaded once with ModelScope's hub client; a complete cached folder is used without any network
call; when the hub is unreachable and nothing is cached, ModelNotAvailableError says what to do (mount
the folder and set M2FP_MODEL to its path). Output matches the official pipeline: parts with
score >= 0.1 (never Background), humans with score > 0.1, each sorted by score (descending). An image with
nobody in it gives an empty Parsing. Bad image input raises InvalidImageError (a ValueError).
"""
from .config import ConfigError, ModelConfig, load_config
from .network import ModelLoadError, build_network, load_weights
from .parser import DEFAULT_MODEL_ID, DEFAULT_MODEL_REVISION, HumanParser
from .preprocess import InvalidImageError
from .source import ModelNotAvailableError
from .types import Instance, Parsing

__all__ = [
    "HumanParser", "Parsing", "Instance", "ModelConfig", "load_config", "build_network", "load_weights",
    "ConfigError", "ModelLoadError", "ModelNotAvailableError", "InvalidImageError",
    "DEFAULT_MODEL_ID", "DEFAULT_MODEL_REVISION",
]
