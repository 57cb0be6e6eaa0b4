"""Label names for a model's outputs."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from vision.errors import ConfigurationError

IMAGENET = "imagenet"


@lru_cache(maxsize=1)
def imagenet_names() -> tuple[str, ...]:
    """torchvision's ImageNet-1k class names, in model output order."""
    from torchvision.models._meta import _IMAGENET_CATEGORIES

    return tuple(_IMAGENET_CATEGORIES)


def resolve_labels(source: str) -> tuple[str, ...]:
    """`imagenet`, or a label file: `index<TAB>name` lines (ML-Images dictionary), the ML-Images hierarchy
    format, or NUS-WIDE-style JSON. Names are indexed by output position."""
    if source == IMAGENET:
        return imagenet_names()
    from vision.vocab import VocabularyError, load_vocabulary

    path = Path(source)
    if not path.is_file():
        raise ConfigurationError(f"label file {path} does not exist")
    try:
        return tuple(load_vocabulary(path).names)
    except VocabularyError as exc:
        raise ConfigurationError(str(exc)) from None
