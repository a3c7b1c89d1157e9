"""Batched image augmentation on the accelerator, and uint8 tensor datasets that DataLoader workers only index.

The reference transforms (``RandomResizedCrop(224)`` + horizontal flip for training, ``Resize(224)`` for evaluation)
run per image on the CPU through PIL, which cannot keep a GPU fed at several thousand images per second. Here the
decoded images stay ``uint8`` tensors; a whole minibatch is moved to the device and cropped, flipped and resized there
with one ``grid_sample`` call whose per-sample affine grid encodes each sample's crop box and flip.

Interpolation is bilinear with half-pixel centres (``align_corners=False``) and no antialiasing. That equals
``torchvision``'s ``Resize`` / ``resized_crop`` on tensors for upsampling (the CIFAR-100 case: 32 px crops to 224 px,
where antialiasing does nothing). Downsampling (large folder images) skips the antialias filter that PIL applies.
One difference at crop borders: the grid samples the full image, so the outermost output pixels of a crop blend in
the neighbouring source pixel (half a source pixel at most), where torchvision's crop-then-resize repeats the edge.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F


RRC_SCALE = (0.08, 1.0)  # torchvision's RandomResizedCrop defaults
RRC_RATIO = (3.0 / 4.0, 4.0 / 3.0)
RRC_ATTEMPTS = 10


def sample_crop_boxes(
    n: int,
    height: int,
    width: int,
    scale: Sequence[float] = RRC_SCALE,
    ratio: Sequence[float] = RRC_RATIO,
    generator: Optional[torch.Generator] = None,
    device: Union[str, torch.device, None] = None,
) -> torch.Tensor:
    """``n`` crop boxes ``(top, left, height, width)`` (long, shape ``(n, 4)``) drawn as ``RandomResizedCrop`` does.

    Per sample: up to 10 tries of an area fraction in ``scale`` and a log-uniform aspect ratio in ``ratio``; the first
    box that fits is kept, at a uniformly random integer position. Samples with no fitting try get torchvision's
    fallback, a centre crop with the ratio clamped to ``ratio``. All samples are drawn at once, without host syncs.
    """
    if not (0 < scale[0] <= scale[1]) or not (0 < ratio[0] <= ratio[1]):
        raise ValueError(f"scale and ratio must be increasing positive pairs, got scale={scale}, ratio={ratio}")
    if generator is not None:
        device = generator.device
    kw = dict(device=device, generator=generator)
    area = float(height * width)
    log_r = (math.log(ratio[0]), math.log(ratio[1]))
    target = area * (scale[0] + (scale[1] - scale[0]) * torch.rand(n, RRC_ATTEMPTS, **kw))
    aspect = torch.exp(log_r[0] + (log_r[1] - log_r[0]) * torch.rand(n, RRC_ATTEMPTS, **kw))
    w = torch.round(torch.sqrt(target * aspect))
    h = torch.round(torch.sqrt(target / aspect))
    ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    # index of the first fitting try (argmax of a bool picks the first True); rows with none fall back below
    first = ok.to(torch.uint8).argmax(dim=1, keepdim=True)
    found = ok.any(dim=1)
    w = w.gather(1, first).squeeze(1)
    h = h.gather(1, first).squeeze(1)
    u = torch.rand(n, 2, **kw)
    top = torch.floor(u[:, 0] * (height - h + 1))
    left = torch.floor(u[:, 1] * (width - w + 1))

    in_ratio = width / height
    if in_ratio < ratio[0]:
        fw, fh = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        fw, fh = int(round(height * ratio[1])), height
    else:
        fw, fh = width, height
    fallback = torch.tensor([(height - fh) // 2, (width - fw) // 2, fh, fw], dtype=torch.float32, device=w.device)
    boxes = torch.stack([top, left, h, w], dim=1)
    boxes = torch.where(found.unsqueeze(1), boxes, fallback)
    return boxes.long()


def boxes_to_theta(boxes: torch.Tensor, height: int, width: int, flip: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Affine matrices ``(n, 2, 3)`` for ``F.affine_grid(align_corners=False)`` that map the output onto each box.

    Output pixel ``u`` of an ``S``-wide output reads source ``x = left + (u + 0.5) * w / S - 0.5``, the same
    half-pixel mapping as resizing the cropped image; ``flip`` (bool, per sample) mirrors the crop horizontally.
    """
    b = boxes.to(torch.float32)
    top, left, h, w = b.unbind(dim=1)
    sx = w / width
    sy = h / height
    if flip is not None:
        sx = torch.where(flip, -sx, sx)
    tx = (2.0 * left + w) / width - 1.0
    ty = (2.0 * top + h) / height - 1.0
    zero = torch.zeros_like(sx)
    return torch.stack([torch.stack([sx, zero, tx], dim=1), torch.stack([zero, sy, ty], dim=1)], dim=1)


def to_unit_float(images: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``uint8`` images to ``dtype`` in [0, 1]; floating images are only cast."""
    if images.dtype == torch.uint8:
        return images.to(dtype) / 255.0
    if not images.is_floating_point():
        raise TypeError(f"images must be uint8 or floating point, got {images.dtype}")
    return images.to(dtype)


class DeviceAugment:
    """Batched on-device ``RandomResizedCrop`` + horizontal flip (training) and ``Resize`` (evaluation).

    Call it as ``augment(x, training) -> x``, the signature of ``InfLoRAStrategy(input_transform=...)``. ``x`` is a
    ``(N, C, H, W)`` batch, ``uint8`` (0..255) or float (0..1), on any device; the result is float32 in [0, 1]
    (then normalised by ``mean``/``std`` if given) of shape ``(N, C, resolution, resolution)`` on the same device.

    Args:
        resolution: output side in pixels.
        scale, ratio: ``RandomResizedCrop``'s area and aspect-ratio ranges.
        flip: apply a random horizontal flip with probability 0.5 in training.
        random_crop: ``False`` skips the random crop in training (only resize, and flip if ``flip``).
        eval_crop: evaluation geometry of non-square images: ``"resize"`` resizes the shorter side to ``resolution``
            then centre-crops (``Resize(resolution)`` + ``CenterCrop``); square images are simply resized.
        mean, std: optional per-channel normalisation applied after the geometry.
        seed: seeds a private generator (per device) so crops and flips are reproducible; ``None`` uses the global RNG.
    """

    def __init__(
        self,
        resolution: int = 224,
        scale: Sequence[float] = RRC_SCALE,
        ratio: Sequence[float] = RRC_RATIO,
        flip: bool = True,
        random_crop: bool = True,
        mean: Optional[Sequence[float]] = None,
        std: Optional[Sequence[float]] = None,
        seed: Optional[int] = None,
    ) -> None:
        if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 1:
            raise ValueError(f"resolution must be a positive number of pixels, got {resolution!r}")
        if (mean is None) != (std is None):
            raise ValueError("pass both mean and std to normalise, or neither")
        if std is not None and any(s <= 0 for s in std):
            raise ValueError(f"std must be positive, got {list(std)}")
        if not (0 < scale[0] <= scale[1]) or not (0 < ratio[0] <= ratio[1]):
            raise ValueError(f"scale and ratio must be increasing positive pairs, got scale={scale}, ratio={ratio}")
        self.resolution = resolution
        self.scale = (float(scale[0]), float(scale[1]))
        self.ratio = (float(ratio[0]), float(ratio[1]))
        self.flip = flip
        self.random_crop = random_crop
        self.mean = None if mean is None else tuple(float(m) for m in mean)
        self.std = None if std is None else tuple(float(s) for s in std)
        self.seed = seed
        self._generators: dict[str, torch.Generator] = {}

    def generator(self, device: torch.device) -> Optional[torch.Generator]:
        """The seeded generator of ``device`` (created on first use), or ``None`` without a seed."""
        if self.seed is None:
            return None
        key = str(device)
        if key not in self._generators:
            self._generators[key] = torch.Generator(device=device).manual_seed(self.seed)
        return self._generators[key]

    def __call__(self, x: torch.Tensor, training: bool = True) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError(f"expected a batch of images (N, C, H, W), got shape {tuple(x.shape)}")
        out = self.train_view(x) if training else self.eval_view(x)
        return self._normalize(out)

    def train_view(self, x: torch.Tensor) -> torch.Tensor:
        """Random resized crop and flip of every image, one box per sample, in one ``grid_sample``."""
        n, _, height, width = x.shape
        gen = self.generator(x.device)
        if self.random_crop:
            boxes = sample_crop_boxes(n, height, width, self.scale, self.ratio, generator=gen, device=x.device)
        else:
            boxes = torch.tensor([[0, 0, height, width]], device=x.device).expand(n, 4)
        flip = torch.rand(n, device=x.device, generator=gen) < 0.5 if self.flip else None
        return self._sample(x, boxes_to_theta(boxes, height, width, flip))

    def eval_view(self, x: torch.Tensor) -> torch.Tensor:
        """``Resize(resolution)`` (shorter side) + centre crop; a plain resize for square images."""
        n, _, height, width = x.shape
        s = self.resolution
        if height == width:
            img = to_unit_float(x)
            if height == s:
                return img.contiguous()
            return F.interpolate(img, size=(s, s), mode="bilinear", align_corners=False, antialias=False)
        side = min(height, width)
        # The centre square of the original, resized, is Resize(shorter side) + CenterCrop up to sub-pixel rounding.
        box = torch.tensor([[(height - side) / 2, (width - side) / 2, side, side]], device=x.device)
        return self._sample(x, boxes_to_theta(box.expand(n, 4), height, width))

    def _sample(self, x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        img = to_unit_float(x)
        grid = F.affine_grid(theta, [x.shape[0], x.shape[1], self.resolution, self.resolution], align_corners=False)
        # border padding clamps like interpolate() does at the image edges
        return F.grid_sample(img, grid, mode="bilinear", padding_mode="border", align_corners=False)

    def _normalize(self, x: torch.Tensor) -> torch.Tensor:
        if self.mean is None:
            return x
        mean = torch.tensor(self.mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
        return (x - mean) / std

    def __repr__(self) -> str:
        return (
            f"DeviceAugment(resolution={self.resolution}, scale={self.scale}, ratio={self.ratio}, flip={self.flip}, "
            f"random_crop={self.random_crop}, mean={self.mean}, std={self.std}, seed={self.seed})"
        )


def images_to_uint8_tensor(images: Sequence) -> torch.Tensor:
    """PIL images (or HWC uint8 arrays) of one size to a ``uint8`` tensor ``(N, C, H, W)``."""
    import numpy as np

    arrays = [np.asarray(img.convert("RGB") if hasattr(img, "convert") else img, dtype=np.uint8) for img in images]
    if not arrays:
        raise ValueError("no images given")
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
        raise ValueError(f"images must share one size to be stacked, got sizes {sorted(shapes)[:3]}")
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
