"""Class-incremental benchmark streams: Split CIFAR-100, ImageNet-R, DomainNet, any image folder, the digits demo and a
synthetic stream."""

from .cifar import split_cifar100
from .common import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    DataUnavailableError,
    ImageLoadError,
    StreamInfo,
    class_incremental_stream,
    TensorImageDataset,
    image_transforms,
)
from .digits import split_digits
from .domainnet import DOMAINNET_DOMAINS, split_domainnet
from .folder import ImageFileDataset, folder_benchmark, folder_split, read_manifest, scan_class_folders
from .imagenet_r import split_imagenet_r
from .synthetic import split_synthetic

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "DOMAINNET_DOMAINS",
    "DataUnavailableError",
    "ImageLoadError",
    "ImageFileDataset",
    "StreamInfo",
    "TensorImageDataset",
    "class_incremental_stream",
    "folder_benchmark",
    "folder_split",
    "image_transforms",
    "read_manifest",
    "scan_class_folders",
    "split_cifar100",
    "split_digits",
    "split_domainnet",
    "split_imagenet_r",
    "split_synthetic",
]
