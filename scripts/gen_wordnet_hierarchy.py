#!/usr/bin/env python3
"""Generate the ImageNet-1k WordNet hierarchy in Tencent ML-Images format.

The output (committed as services/vision/labels/data/imagenet_wordnet_hierarchy.tsv)
is a 4-column, tab-separated file with the header

    category_index  category_id  index_of_parent_category  category name

and is read by ``vision.labels.vocab.load_mlimages``. Layout:

* Indices 0..999 are the 1000 ImageNet-1k classes in model output order, so a
  classifier's output index is its label index. The order and WordNet ids come
  from timm's ``timm/data/_info/imagenet_synsets.txt``; ImageNet class ids are
  WordNet 3.0 noun offsets (wnid = "n" + 8-digit offset).
* Indices 1000.. are the ancestor concepts, up to the root ``entity``
  (n00001740), ordered by WordNet id so the file is deterministic.

Parent choice. WordNet nouns can have several hypernyms, but this format allows
one parent. Each synset's parent is the FIRST hypernym pointer (``@``) listed
on its line in WordNet 3.0's ``data.noun``; a synset with no ``@`` pointer
uses its first instance-hypernym pointer (``@i``) instead. This is the order
WordNet's own lexicographer files give, so it is reproducible without any
judgement calls, but it does drop secondary parents (e.g. a concept that is
both an artifact and a covering keeps only the first).

Names. Ancestor concepts are named by the first lemma of their synset, with
underscores turned into spaces. The 1000 classes take torchvision's ImageNet
names (``torchvision.models.ResNet50_Weights.IMAGENET1K_V1.meta["categories"]``,
torchvision's public weights metadata) by default, so tags
match the classification service's labels; ``--leaf-names wordnet`` uses the
first lemma for them too. Names repeat (two "crane"s, and a class may share its
name with an ancestor); labels are keyed by index and WordNet id, not name.

Sources are local only: WordNet 3.0 from Debian's ``wordnet-base`` package
(``apt-get install -y wordnet-base`` puts ``data.noun`` in /usr/share/wordnet)
and the timm/torchvision packages installed in the project's virtualenv.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT_WNID = "n00001740"  # entity.n.01
DEFAULT_OUT = "services/vision/labels/data/imagenet_wordnet_hierarchy.tsv"
HEADER = "category_index\tcategory_id\tindex_of_parent_category\tcategory name"


class Synset:
    __slots__ = ("wnid", "lemma", "parent")

    def __init__(self, wnid: str, lemma: str, parent: str | None) -> None:
        self.wnid = wnid
        self.lemma = lemma
        self.parent = parent


def parse_data_noun(path: Path) -> dict[str, Synset]:
    """Read WordNet's data.noun: first lemma and chosen parent of every noun synset.

    Line layout (wndb(5)): offset lex_filenum ss_type w_cnt(hex) {word lex_id}*w_cnt
    p_cnt(3-digit decimal) {pointer_symbol offset pos source/target}*p_cnt ... | gloss
    """
    synsets: dict[str, Synset] = {}
    with open(path, encoding="utf-8", errors="strict") as fh:
        for number, line in enumerate(fh, start=1):
            if line.startswith("  "):  # the licence header lines start with two spaces
                continue
            fields = line.split(" | ", 1)[0].split()
            try:
                offset, n_words = fields[0], int(fields[3], 16)
                lemma = fields[4]
                pos = 4 + 2 * n_words
                n_pointers = int(fields[pos])
                pointers = [fields[pos + 1 + 4 * k : pos + 5 + 4 * k] for k in range(n_pointers)]
            except (IndexError, ValueError) as exc:
                raise SystemExit(
                    f"{path}:{number}: cannot parse data.noun line ({exc}): {line[:80]!r}"
                ) from None
            hypernyms = [p[1] for p in pointers if p[0] == "@" and p[2] == "n"]
            instance_of = [p[1] for p in pointers if p[0] == "@i" and p[2] == "n"]
            candidates = hypernyms or instance_of
            chosen = candidates[0] if candidates else None
            synsets["n" + offset] = Synset(
                "n" + offset, lemma.replace("_", " "), None if chosen is None else "n" + chosen
            )
    return synsets


def read_imagenet_wnids(path: Path) -> list[str]:
    wnids = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if len(wnids) != 1000 or len(set(wnids)) != 1000:
        raise SystemExit(
            f"{path}: expected 1000 distinct ImageNet wnids, found {len(wnids)} ({len(set(wnids))} distinct)"
        )
    return wnids


def default_synsets_file() -> Path:
    import timm

    return Path(timm.__file__).parent / "data" / "_info" / "imagenet_synsets.txt"


def torchvision_names() -> list[str]:
    from torchvision.models import ResNet50_Weights

    return list(ResNet50_Weights.IMAGENET1K_V1.meta["categories"])


def build_rows(
    synsets: dict[str, Synset], classes: list[str], class_names: list[str]
) -> list[tuple[int, str, int, str]]:
    """(index, wnid, parent index or -1, name) rows: classes first, then ancestors by wnid."""
    ancestors: set[str] = set()
    for wnid in classes:
        if wnid not in synsets:
            raise SystemExit(f"ImageNet class {wnid} is not a WordNet 3.0 noun synset in data.noun")
        node = synsets[wnid].parent
        while node is not None and node not in ancestors:
            ancestors.add(node)
            node = synsets[node].parent
    class_set = set(classes)
    # A class that is also an ancestor of another class keeps its class index.
    extra = sorted(ancestors - class_set)
    order = classes + extra
    index_of = {wnid: i for i, wnid in enumerate(order)}
    rows = []
    for i, wnid in enumerate(order):
        parent = synsets[wnid].parent
        name = class_names[i] if i < len(classes) else synsets[wnid].lemma
        rows.append((i, wnid, -1 if parent is None else index_of[parent], name))
    roots = [row for row in rows if row[2] == -1]
    if [row[1] for row in roots] != [ROOT_WNID]:
        raise SystemExit(f"expected the single root {ROOT_WNID} (entity), got {[r[1] for r in roots]}")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(
            "To regenerate the committed file (needs `apt-get install -y wordnet-base`):\n"
            "  python scripts/gen_wordnet_hierarchy.py --wordnet /usr/share/wordnet \\\n"
            f"      --out {DEFAULT_OUT}"
        ),
    )
    parser.add_argument(
        "--wordnet",
        type=Path,
        default=Path("/usr/share/wordnet"),
        help="WordNet 3.0 dict directory containing data.noun (default: %(default)s)",
    )
    parser.add_argument(
        "--synsets",
        type=Path,
        default=None,
        help="the 1000 ImageNet wnids in class order (default: timm's imagenet_synsets.txt)",
    )
    parser.add_argument(
        "--leaf-names",
        choices=("torchvision", "wordnet"),
        default="torchvision",
        help="names for the 1000 classes (default: %(default)s)",
    )
    parser.add_argument(
        "--out", type=Path, default=Path(DEFAULT_OUT), help="output file (default: %(default)s)"
    )
    args = parser.parse_args(argv)

    data_noun = args.wordnet / "data.noun"
    if not data_noun.is_file():
        parser.error(f"{data_noun} not found; install WordNet 3.0 with `apt-get install -y wordnet-base`")
    synsets = parse_data_noun(data_noun)
    classes = read_imagenet_wnids(args.synsets or default_synsets_file())
    names = torchvision_names() if args.leaf_names == "torchvision" else [synsets[w].lemma for w in classes]
    rows = build_rows(synsets, classes, names)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", encoding="utf-8", newline="\n") as fh:
        fh.write(HEADER + "\n")
        for index, wnid, parent, name in rows:
            fh.write(f"{index}\t{wnid}\t{parent}\t{name}\n")
    print(
        f"wrote {len(rows)} labels ({len(classes)} classes, "
        f"{len(rows) - len(classes)} ancestors) to {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
