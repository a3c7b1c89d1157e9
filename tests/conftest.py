"""Shared fixtures: tiny timm ViTs (random weights) and class-separable synthetic image datasets."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence

import pytest
import timm
import torch
from torch.utils.data import Dataset

torch.set_num_threads(min(2, torch.get_num_threads()))

# The project's shared test files, found next to the checkout (../shared) unless the variables point elsewhere:
# `python -m pytest -q tests` runs the same tests here as .ci/run does.
SHARED = Path(__file__).resolve().parents[2] / "shared"
TEST_DATA = os.environ.get("INFLORA_TEST_DATA") or (
    str(SHARED / "data" / "tiny-imagenet-100") if (SHARED / "data" / "tiny-imagenet-100").is_dir() else None)
TEST_WEIGHTS = os.environ.get("INFLORA_TEST_WEIGHTS") or (
    str(SHARED / "weights" / "vit_small_patch14_dinov2.imgfocus.fp16.safetensors")
    if (SHARED / "weights" / "vit_small_patch14_dinov2.imgfocus.fp16.safetensors").is_file() else None)

@pytest.fixture
def one_torch_thread():
    """torch on one CPU thread for the test, then as it was."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


TINY_VIT = dict(img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2)


def tiny_vit(depth: int = 2, embed_dim: int = 32, seed: int = 0, **overrides) -> torch.nn.Module:
    """A 2-block, width-32 timm ViT with random weights (built offline)."""
    torch.manual_seed(seed)
    kwargs = {**TINY_VIT, "depth": depth, "embed_dim": embed_dim, **overrides}
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, **kwargs)


class SyntheticImages(Dataset):
    """Images of class ``c`` = a fixed random prototype for ``c`` plus Gaussian noise; torchvision-style.

    With ``patterns_per_group=k``, classes come in groups (``c // group_size``) whose images are combinations of
    ``k`` random patterns private to the group, so different groups (tasks) occupy different input subspaces. The
    patterns are ``tile``-pixel squares repeated over the image, so every patch token of a group lies in the same
    k-dimensional space (up to the position embedding).
    """

    def __init__(
        self,
        classes: Sequence[int],
        per_class: int,
        seed: int,
        noise: float = 0.5,
        size: int = 32,
        patterns_per_group: int = 0,
        group_size: int = 2,
        tile: int = 8,
    ) -> None:
        gen = torch.Generator().manual_seed(seed)
        proto_gen = torch.Generator().manual_seed(1234)
        num = max(classes) + 1
        self.targets = [int(c) for c in classes for _ in range(per_class)]
        labels = torch.tensor(self.targets)
        if patterns_per_group:
            groups = num // group_size + 1
            reps = size // tile
            tiles = torch.randn(groups, patterns_per_group, 3, tile, tile, generator=proto_gen)
            patterns = tiles.repeat(1, 1, 1, reps, reps).reshape(groups, patterns_per_group, -1)
            coeffs = torch.randn(num, patterns_per_group, generator=proto_gen)
            protos = torch.einsum("ck,ckp->cp", coeffs, patterns[torch.arange(num) // group_size])
            jitter = torch.randn(len(labels), patterns_per_group, generator=gen)
            own = patterns[labels // group_size]
            x = protos[labels] + noise * torch.einsum("nk,nkp->np", jitter, own)
            self.x = x.reshape(-1, 3, size, size) / patterns_per_group**0.5
        else:
            protos = torch.randn(num, 3, size, size, generator=proto_gen)
            self.x = protos[labels] + noise * torch.randn(len(labels), 3, size, size, generator=gen)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        return self.x[i], self.targets[i]


@pytest.fixture
def shared_weights() -> str:
    if not TEST_WEIGHTS or not os.path.isfile(TEST_WEIGHTS):
        pytest.skip("the shared ViT-S/14 weights are neither in ../shared/weights nor named by INFLORA_TEST_WEIGHTS")
    return TEST_WEIGHTS


def start_at_once(commands: Sequence[Sequence[str]], folder: Path, env: Optional[dict] = None
                  ) -> list[tuple[int, str]]:
    """Run ``inflora-avalanche`` commands in separate processes, released at the same moment once every one has
    imported the runner (a race on one output folder); (exit code, stderr) of each."""
    import subprocess
    import sys
    import time

    starter = ("import os, sys, time\n"
               "from inflora_avalanche.run import cli, compare, loop, output\n"
               "open(sys.argv[1], 'w').close()\n"
               "while not os.path.exists(sys.argv[2]):\n"
               "    time.sleep(0.002)\n"
               "sys.exit(cli.main(sys.argv[3:]))\n")
    go = folder / "go"
    procs = [subprocess.Popen([sys.executable, "-c", starter, str(folder / f"ready{i}"), str(go), *command],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=folder,
                              env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})})
             for i, command in enumerate(commands)]
    deadline = time.time() + 120
    while not all((folder / f"ready{i}").exists() for i in range(len(procs))) and time.time() < deadline:
        time.sleep(0.01)
    go.touch()
    errors = [proc.communicate(timeout=300)[1] for proc in procs]
    return [(proc.returncode, err) for proc, err in zip(procs, errors)]
