"""The twelve paper presets against the reference implementation's own settings.

Reference: github.com/liangyanshuo/InfLoRA at commit e08b00edd54f2f10cf2f9826eae7d44fdcb6354b. Each row of
``REFERENCE`` below is written down by hand from one of its ``configs/*.json`` files, in our preset vocabulary;
the values a config does not hold come from the method class its ``model_name`` selects (``utils/factory.py``):

- optimiser and schedule: ``optim`` + ``lrate`` (+ ``fc_lrate`` for the heads where the method builds two
  parameter groups) + ``weight_decay``. Adam always uses betas (0.9, 0.999) and the reference's ``CosineSchedule``
  (our ``"cosine"``). SGD always uses momentum 0.9; ``InfLoRA_domain`` / ``InfLoRAb5_domain`` / ``InfLoRA_CA1``
  step x ``lrate_decay`` at epoch 4 (DomainNet) or 18 (CIFAR-100); ``InfLoRA_CA`` uses torch's
  ``CosineAnnealingLR(T_max=epochs)`` and one learning rate for everything.
- memory: ``InfLoRA`` calls ``update_DualGPM``; ``InfLoRAb5``, ``InfLoRA_CA``, ``InfLoRA_CA1`` and the two
  ``*_domain`` classes call ``update_GPM``.
- adapted blocks: the ``b5`` classes build ``models/vit_inflorab5.py``, whose first 5 blocks (``range(5)``) carry
  branches; all others adapt all 12.
- final LayerNorm: ``InfLoRA_CA1`` replaces it with a fresh one when the dataset is cifar100; nothing else does.
- classifier alignment: ``InfLoRA_CA`` / ``InfLoRA_CA1`` run ``_stage2_compact_classifier`` (``REFERENCE_CA``).

Only the JSON files are read, through the runner's own (torch-free) config layering: no model, no Avalanche.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

import inflora_avalanche
from inflora_avalanche.run.presets import layered_config

PACKAGE = Path(inflora_avalanche.__file__).parent
PRESETS = PACKAGE / "presets"
METHODS = ("inflora", "inflora_b5", "inflora_ca")

# Classifier alignment, identical in methods/inflora_ca.py and methods/inflora_ca1.py (_stage2_compact_classifier
# and _compute_class_mean): 5 epochs; 256 features drawn per seen class; minibatches of 256; SGD lr 0.01,
# momentum 0.9, weight decay 5e-4; CosineAnnealingLR(T_max=5); logits divided by the mean per-task norm and by
# logit_norm = 0.1 (InfLoRA_CA1 always, InfLoRA_CA whenever the dataset is not cifar100); class means scaled by
# 0.9 + 0.1 (task + 1) / (t + 1); one full covariance per class, + 1e-4 I.
REFERENCE_CA = {
    "epochs": 5,
    "samples_per_class": 256,
    "batch_size": 256,
    "lr": 0.01,
    "momentum": 0.9,
    "weight_decay": 5e-4,
    "lr_schedule": "cosine",  # the plugin's "cosine" is CosineAnnealingLR stepped per epoch
    "logit_normalization": True,
    "temperature": 0.1,
    "mean_scaling": True,
    "covariance": "full",
    "covariance_eps": 1e-4,
}

ADAM = {"optimizer": "adam", "betas": [0.9, 0.999], "lr_schedule": "cosine"}

# preset name -> the reference's values. adapted_blocks None = all blocks; classifier_alignment None = no CA.
REFERENCE: dict[str, dict] = {
    # configs/cifar100_inflora.json (model_name InfLoRA)
    "cifar100_inflora": {
        "method": "inflora", "benchmark": "split_cifar100", "n_experiences": 10, "epochs": 20, "batch_size": 128,
        **ADAM, "lr": 5e-4, "head_lr": 5e-4, "weight_decay": 0.0,
        "rank": 10, "adapted_blocks": None, "lamb": 0.95, "lame": 1.0, "memory": "dualgpm",
        "reset_final_norm": False, "classifier_alignment": None,
    },
    # configs/cifar100_inflorab5.json (model_name InfLoRAb5)
    "cifar100_inflora_b5": {
        "method": "inflora_b5", "benchmark": "split_cifar100", "n_experiences": 10, "epochs": 20, "batch_size": 128,
        **ADAM, "lr": 1e-3, "head_lr": 1e-3, "weight_decay": 0.0,
        "rank": 10, "adapted_blocks": 5, "lamb": 0.95, "lame": 1.0, "memory": "gpm",
        "reset_final_norm": False, "classifier_alignment": None,
    },
    # configs/cifar100_infloraca.json (model_name InfLoRA_CA1)
    "cifar100_inflora_ca": {
        "method": "inflora_ca", "benchmark": "split_cifar100", "n_experiences": 10, "epochs": 20, "batch_size": 128,
        "optimizer": "sgd", "lr": 1e-3, "head_lr": 1e-2, "momentum": 0.9, "weight_decay": 1e-3,
        "lr_schedule": "step", "milestones": [18], "gamma": 0.1,
        "rank": 5, "adapted_blocks": None, "lamb": 0.95, "lame": 1.0, "memory": "gpm",
        "reset_final_norm": True, "classifier_alignment": REFERENCE_CA,
    },
    # configs/mimg5_inflora.json (model_name InfLoRA)
    "imagenet_r_5": {
        "method": "inflora", "benchmark": "imagenet_r", "n_experiences": 5, "epochs": 50, "batch_size": 128,
        **ADAM, "lr": 5e-4, "head_lr": 5e-4, "weight_decay": 0.0,
        "rank": 10, "adapted_blocks": None, "lamb": 0.98, "lame": 1.0, "memory": "dualgpm",
        "reset_final_norm": False, "classifier_alignment": None,
    },
    # configs/mimg10_inflora.json (model_name InfLoRA)
    "imagenet_r_10": {
        "method": "inflora", "benchmark": "imagenet_r", "n_experiences": 10, "epochs": 50, "batch_size": 128,
        **ADAM, "lr": 5e-4, "head_lr": 5e-4, "weight_decay": 0.0,
        "rank": 10, "adapted_blocks": None, "lamb": 0.98, "lame": 1.0, "memory": "dualgpm",
        "reset_final_norm": False, "classifier_alignment": None,
    },
    # configs/mimg20_inflora.json (model_name InfLoRA)
    "imagenet_r_20": {
        "method": "inflora", "benchmark": "imagenet_r", "n_experiences": 20, "epochs": 50, "batch_size": 128,
        **ADAM, "lr": 5e-4, "head_lr": 5e-4, "weight_decay": 0.0,
        "rank": 10, "adapted_blocks": None, "lamb": 0.98, "lame": 1.0, "memory": "dualgpm",
        "reset_final_norm": False, "classifier_alignment": None,
    },
    # configs/mimg10_infloraca.json (model_name InfLoRA_CA: SGD on all trained parameters at lrate, no fc_lrate)
    "imagenet_r_10_ca": {
        "method": "inflora_ca", "benchmark": "imagenet_r", "n_experiences": 10, "epochs": 50, "batch_size": 128,
        "optimizer": "sgd", "lr": 1e-3, "head_lr": 1e-3, "momentum": 0.9, "weight_decay": 0.0,
        "lr_schedule": "annealing",
        "rank": 10, "adapted_blocks": None, "lamb": 0.95, "lame": 1.0, "memory": "gpm",
        "reset_final_norm": False, "classifier_alignment": REFERENCE_CA,
    },
    # configs/mimg5_inflorab5.json (model_name InfLoRAb5; lamb 0.98, unlike the 10- and 20-task b5 configs)
    "imagenet_r_5_b5": {
        "method": "inflora_b5", "benchmark": "imagenet_r", "n_experiences": 5, "epochs": 50, "batch_size": 128,
        **ADAM, "lr": 5e-4, "head_lr": 5e-4, "weight_decay": 0.0,
        "rank": 10, "adapted_blocks": 5, "lamb": 0.98, "lame": 1.0, "memory": "gpm",
        "reset_final_norm": False, "classifier_alignment": None,
    },
    # configs/mimg10_inflorab5.json (model_name InfLoRAb5)
    "imagenet_r_10_b5": {
        "method": "inflora_b5", "benchmark": "imagenet_r", "n_experiences": 10, "epochs": 50, "batch_size": 128,
        **ADAM, "lr": 5e-4, "head_lr": 5e-4, "weight_decay": 0.0,
        "rank": 10, "adapted_blocks": 5, "lamb": 0.99, "lame": 1.0, "memory": "gpm",
        "reset_final_norm": False, "classifier_alignment": None,
    },
    # configs/mimg20_inflorab5.json (model_name InfLoRAb5)
    "imagenet_r_20_b5": {
        "method": "inflora_b5", "benchmark": "imagenet_r", "n_experiences": 20, "epochs": 50, "batch_size": 128,
        **ADAM, "lr": 5e-4, "head_lr": 5e-4, "weight_decay": 0.0,
        "rank": 10, "adapted_blocks": 5, "lamb": 0.99, "lame": 1.0, "memory": "gpm",
        "reset_final_norm": False, "classifier_alignment": None,
    },
    # configs/domainnet_inflora.json (model_name InfLoRA_domain)
    "domainnet_inflora": {
        "method": "inflora", "benchmark": "domainnet", "n_experiences": 5, "epochs": 5, "batch_size": 128,
        "optimizer": "sgd", "lr": 5e-3, "head_lr": 1e-2, "momentum": 0.9, "weight_decay": 0.0,
        "lr_schedule": "step", "milestones": [4], "gamma": 0.1,
        "rank": 30, "adapted_blocks": None, "lamb": 0.95, "lame": 1.0, "memory": "gpm",
        "reset_final_norm": False, "classifier_alignment": None,
    },
    # configs/domainnet_inflorab5.json (model_name InfLoRAb5_domain)
    "domainnet_inflora_b5": {
        "method": "inflora_b5", "benchmark": "domainnet", "n_experiences": 5, "epochs": 5, "batch_size": 128,
        "optimizer": "sgd", "lr": 5e-3, "head_lr": 1e-2, "momentum": 0.9, "weight_decay": 0.0,
        "lr_schedule": "step", "milestones": [4], "gamma": 0.1,
        "rank": 30, "adapted_blocks": 5, "lamb": 0.95, "lame": 1.0, "memory": "gpm",
        "reset_final_norm": False, "classifier_alignment": None,
    },
}

# The published figures, as docs/inflora-algorithm.md quotes them; no other paper preset carries any.
PUBLISHED = {
    "cifar100_inflora": {"A_last": "86.51 ± 0.73", "A_avg": "91.70 ± 0.32"},
    "imagenet_r_10": {"A_last": "75.65 ± 0.14", "A_avg": "80.82 ± 0.24"},
    "imagenet_r_5": {"A_last": "77.52", "A_avg": "82.01"},
    "imagenet_r_20": {"A_last": "71.01", "A_avg": "77.28"},
}

def _load(name: str) -> dict:
    return json.loads((PRESETS / f"{name}.json").read_text())


def _effective(name: str) -> dict:
    """The settings a run of preset ``name`` gets (the runner's own layering: defaults, the method's preset, the
    preset), for the keys of the table."""
    values = layered_config(name, None, {"data_root": "data"})
    if values["head_lr"] is None:
        values["head_lr"] = values["lr"]
    ca = values.get("classifier_alignment")
    if ca is not None:  # the plugin's defaults under the preset's kwargs, on the settings the reference fixes
        ca = {**_ca_plugin_defaults(), **ca}
        ca = {key: ca.get(key) for key in REFERENCE_CA}
    values["classifier_alignment"] = ca
    return values


def _literal_defaults(path: Path, class_name: str) -> dict:
    """Keyword defaults of ``class_name.__init__`` in ``path``, read with ast (importing it would pull in Avalanche)."""
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and node.name == class_name:
            for item in node.body:
                if isinstance(item, ast.FunctionDef) and item.name == "__init__":
                    args = item.args.args[len(item.args.args) - len(item.args.defaults):]
                    return {a.arg: ast.literal_eval(d) for a, d in zip(args, item.args.defaults)}
    raise AssertionError(f"{class_name}.__init__ not found in {path}")


def _ca_plugin_defaults() -> dict:
    return _literal_defaults(PACKAGE / "alignment.py", "ClassifierAlignmentPlugin")


def test_the_twelve_paper_presets_are_exactly_those_with_a_method():
    assert len(REFERENCE) == 12
    paper = {p.stem for p in PRESETS.glob("*.json")
             if json.loads(p.read_text()).get("backbone") == "vit_base_patch16_224.augreg_in21k"
             and json.loads(p.read_text()).get("method") != "sd_lora"}
    assert paper == set(REFERENCE)
    for name in REFERENCE:
        assert _load(name)["method"] in METHODS


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_preset_matches_the_reference(name):
    ours = _effective(name)
    wrong = {}
    for key, reference in REFERENCE[name].items():
        if ours.get(key) != reference:
            wrong[key] = {"preset": ours.get(key), "expected": reference}
    assert not wrong, f"{name}: {wrong}"


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_preset_shape(name):
    preset = _load(name)
    row = REFERENCE[name]
    # every paper preset: the paper's backbone and input pipeline, five seeds, a description
    assert preset["backbone"] == "vit_base_patch16_224.augreg_in21k" and preset["pretrained"] is True
    assert preset["resolution"] == 224 and preset["normalize"] is False
    assert preset["seeds"] == [0, 1, 2, 3, 4]
    assert isinstance(preset.get("description"), str) and preset["description"]
    # the fields that only mean something for one optimiser or schedule are set where they apply
    if row["optimizer"] == "adam":
        assert "momentum" not in preset
    else:
        assert "betas" not in preset
    if preset["lr_schedule"] == "step":
        assert preset["milestones"] and "gamma" in preset
    else:
        assert "milestones" not in preset
    # the variant and its settings agree
    method = preset["method"]
    assert (preset.get("adapted_blocks") == 5) == (method == "inflora_b5")
    assert ("classifier_alignment" in preset) == (method == "inflora_ca")
    if method == "inflora_ca":
        assert preset["classifier_alignment"] == {}  # {} = the plugin's defaults, checked against REFERENCE_CA
    assert preset.get("published") == PUBLISHED.get(name)


def test_annealing_schedule_is_torchs_cosine_annealing_per_epoch():
    """``lr_schedule="annealing"`` (the reference's InfLoRA+CA on ImageNet-R) follows torch's CosineAnnealingLR
    stepped once per epoch, epoch by epoch."""
    import torch

    from inflora_avalanche.strategy import cosine_annealing_factor

    for epochs in (1, 5, 50):
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
        for epoch in range(epochs):
            assert cosine_annealing_factor(epoch, epochs) == pytest.approx(optimizer.param_groups[0]["lr"], abs=1e-12)
            optimizer.step()
            scheduler.step()


# ----------------------------------------------------------------------------------------------------- SD-LoRA
# The official code's settings (WuYichen-97/SD-Lora-CL, exps/sdlora_{c100,inr,dom}.json and models/sdlora.py as
# described in ../shared/docs/sdlora-algorithm.md): SGD with momentum 0.9, no weight decay, rank 10 on q and v,
# batch 128, the IN-21k + IN-1k weights requested by their full timm tag, class order np.random.permutation(seed).
def _permutation(seed: int, n: int) -> list[int]:
    import numpy as np

    return [int(c) for c in np.random.RandomState(seed).permutation(n)]


SDLORA_COMMON = {"method": "sd_lora", "optimizer": "sgd", "momentum": 0.9, "weight_decay": 0.0, "rank": 10,
                 "qkv_rows": ["q", "v"], "target_modules": ["attn.qkv"], "batch_size": 128, "resolution": 224,
                 "backbone": "vit_base_patch16_224.augreg2_in21k_ft_in1k", "reset_magnitudes": True,
                 "magnitude_init": 0.8, "rank_reduction": False, "lr_schedule": "step"}
SDLORA_REFERENCE = {
    "cifar100_sdlora": {"benchmark": "split_cifar100", "n_experiences": 10, "epochs": 20, "lr": 0.008,
                        "milestones": [], "class_order": _permutation(1993, 100)},
    **{f"imagenet_r_{n}_sdlora": {"benchmark": "imagenet_r", "n_experiences": n, "epochs": 20, "lr": 0.01,
                                   "milestones": [], "class_order": _permutation(1995, 200)} for n in (5, 10, 20)},
    "domainnet_sdlora": {"benchmark": "domainnet", "n_experiences": 5, "epochs": 10, "lr": 0.02,
                         "milestones": [4, 6, 8], "gamma": 0.005},
}


@pytest.mark.parametrize("name", sorted(SDLORA_REFERENCE))
def test_sdlora_preset_matches_the_official_settings(name):
    ours = layered_config(name, None, {"data_root": "data"})
    expected = {**SDLORA_COMMON, **SDLORA_REFERENCE[name]}
    wrong = {k: (ours.get(k), v) for k, v in expected.items() if ours.get(k) != v}
    assert not wrong, f"{name}: {wrong}"
    assert _permutation(1993, 100)[:5] == [68, 56, 78, 8, 23]  # as the official CIFAR log starts


@pytest.mark.parametrize("fair, inflora", [("cifar100_sdlora_fair", "cifar100_inflora"),
                                           ("imagenet_r_10_sdlora_fair", "imagenet_r_10")])
def test_fair_sdlora_presets_share_inflora_backbone_stream_and_budget(fair, inflora):
    ours, theirs = layered_config(fair, None, {"data_root": "data"}), layered_config(inflora, None, {"data_root": "data"})
    shared = ("backbone", "benchmark", "n_experiences", "class_order", "split_seed", "test_fraction", "resolution",
              "normalize", "epochs", "batch_size", "seeds", "rank", "target_modules", "adapted_blocks")
    assert {k: ours[k] for k in shared} == {k: theirs[k] for k in shared}
    assert ours["method"] == "sd_lora" and ours["optimizer"] == "sgd" and ours["qkv_rows"] == ["q", "v"]
