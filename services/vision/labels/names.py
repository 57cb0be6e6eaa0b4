"""Label names for a model's outputs."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

from vision.core.errors import ConfigurationError

if TYPE_CHECKING:
    from vision.labels.vocab import LabelVocabulary

IMAGENET = "imagenet"
# WordNet 3.0 hypernyms over the ImageNet-1k classes, ML-Images hierarchy format: labels 0..999 are the
# classes in model output order, 1000.. their ancestor concepts. Regenerate: scripts/gen_wordnet_hierarchy.py.
WORDNET_HIERARCHY = Path(__file__).parent / "data" / "imagenet_wordnet_hierarchy.tsv"


IMAGENET_CLASSES = 1000


@lru_cache(maxsize=1)
def imagenet_names() -> tuple[str, ...]:
    """torchvision's ImageNet-1k class names, in model output order: labels 0..999 of the bundled hierarchy,
    which scripts/gen_wordnet_hierarchy.py takes from torchvision's public weights metadata. Read from the
    file, so serving (e.g. with --backend triton) needs neither torch nor torchvision."""
    return tuple(imagenet_wordnet().names[:IMAGENET_CLASSES])


@lru_cache(maxsize=1)
def imagenet_wordnet() -> "LabelVocabulary":
    """The bundled ImageNet-1k WordNet hierarchy (1808 labels), loaded once per process."""
    from vision.labels.vocab import load_mlimages

    return load_mlimages(WORDNET_HIERARCHY)


def read_vocabulary(path: str | Path, what: str = "label") -> "LabelVocabulary":
    """A vocabulary file (label list, ML-Images hierarchy or NUS-WIDE JSON); errors name the file."""
    from vision.labels.vocab import VocabularyError, load_vocabulary

    file = Path(path)
    if not file.is_file():
        raise ConfigurationError(f"{what} file {file} does not exist")
    try:
        return load_vocabulary(file)
    except VocabularyError as exc:
        raise ConfigurationError(str(exc)) from None


def labels_and_vocabulary(source: str | None) -> tuple[tuple[str, ...], "LabelVocabulary | None"]:
    """Output names for a label setting, and the vocabulary read for them (None for `imagenet`), so a
    caller that also needs the file's hierarchy does not read it a second time."""
    if not source:
        raise ConfigurationError(
            "no labels: this architecture has no default label set; give labels=FILE (index<TAB>name lines, "
            "an ML-Images hierarchy, or NUS-WIDE-style JSON)"
        )
    if source == IMAGENET:
        return imagenet_names(), None
    vocab = read_vocabulary(source)
    return tuple(vocab.names), vocab


def resolve_labels(source: str | None) -> tuple[str, ...]:
    """`imagenet`, or a label file: `index<TAB>name` lines (ML-Images dictionary), the ML-Images hierarchy
    format, or NUS-WIDE-style JSON. Names are indexed by output position."""
    return labels_and_vocabulary(source)[0]
