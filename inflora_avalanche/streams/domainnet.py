"""DomainNet: 345 classes over six domains, the dataset's own train/test lists, 5 experiences of 69 classes."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

from .common import DataUnavailableError, config_normalization, config_root
from .folder import PathLike, Sample, check_files_exist, samples_benchmark

DOMAINNET_DOMAINS = ("clipart", "infograph", "painting", "quickdraw", "real", "sketch")
DOMAINNET_CLASSES = 345
DOMAINNET_URL = "http://ai.bu.edu/M3SDA/"


def domainnet_help(root: PathLike, missing: str) -> str:
    return (
        f"DomainNet incomplete at {root}: {missing} is missing. Download the six domains and their "
        f"<domain>_train.txt / <domain>_test.txt lists from {DOMAINNET_URL}, extract them into {root} "
        f"(so that {root}/clipart/<class>/*.jpg and {root}/clipart_train.txt exist) and pass --data-root"
    )


def read_domainnet_list(root: Path, list_file: Path) -> list[Sample]:
    """``(absolute path, label)`` pairs of one ``<domain>_<split>.txt`` (lines ``relative/path.jpg label``)."""
    samples = []
    for number, line in enumerate(list_file.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.rsplit(maxsplit=1)
        if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
            raise DataUnavailableError(f"{list_file}:{number}: expected '<path> <label>', got {line[:80]!r}")
        samples.append((str(root / parts[0]), int(parts[1])))
    return samples


def split_domainnet(
    root: PathLike,
    n_experiences: int = 5,
    domains: Sequence[str] = DOMAINNET_DOMAINS,
    class_order: Optional[Sequence[int]] = None,
    resolution: int = 224,
    normalize: bool = False,
    expected_classes: Optional[int] = DOMAINNET_CLASSES,
    check_files: bool = True,
    **kwargs,
):
    """DomainNet over ``domains``: ``(benchmark, StreamInfo)``; labels are those of the lists (0..344)."""
    root = Path(root)
    if not root.is_dir():
        raise DataUnavailableError(domainnet_help(root, "the folder"))
    train: list[Sample] = []
    test: list[Sample] = []
    for domain in domains:
        for split, out in (("train", train), ("test", test)):
            list_file = root / f"{domain}_{split}.txt"
            if not list_file.is_file():
                raise DataUnavailableError(domainnet_help(root, list_file.name))
            out.extend(read_domainnet_list(root, list_file))
    labels = sorted({y for _, y in train})
    num_classes = labels[-1] + 1 if labels else 0
    if labels != list(range(num_classes)) or (expected_classes is not None and num_classes != expected_classes):
        raise DataUnavailableError(
            f"the DomainNet lists in {root} give labels {labels[:3]}...{labels[-3:]} ({len(labels)} classes), "
            f"expected 0..{(expected_classes or num_classes) - 1}; use the lists distributed with the dataset"
        )
    names: dict[int, str] = {}
    for path, y in train:
        names.setdefault(y, Path(path).parent.name)
    if check_files:
        check_files_exist(train + test, f"DomainNet lists in {root}")
    info = {"root": str(root), "domains": list(domains)}
    return samples_benchmark("domainnet", [names[i] for i in range(num_classes)], train, test, n_experiences,
                             class_order, resolution, normalize, info=info, **kwargs)


def from_config(config: dict, manifest: Optional[PathLike] = None):
    """The registry's builder: DomainNet of a run's ``config`` (``domains``: default all six)."""
    return split_domainnet(config_root(config), config["n_experiences"], config["domains"] or DOMAINNET_DOMAINS,
                           config["class_order"], **config_normalization(config))
