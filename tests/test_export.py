"""Export to a timm model folder: predictions equal the strategy's, nothing of this package needed to load."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import timm
import torch

from conftest import SyntheticImages
from inflora_avalanche import InfLoRAViT
from inflora_avalanche.export import export_timm_checkpoint, load_exported

TINY = dict(img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2)
LABELS = [0, 1, 2, 3, 5, 7]  # labels 4 and 6 never occur: the export must keep label-indexed columns right
CLASS_ORDER = [5, 1, 7, 0, 3, 2]


def _benchmark():
    from avalanche.benchmarks.scenarios.supervised import class_incremental_benchmark
    from avalanche.benchmarks.utils import as_classification_dataset

    return class_incremental_benchmark(
        {"train": as_classification_dataset(SyntheticImages(LABELS, 8, seed=1)),
         "test": as_classification_dataset(SyntheticImages(LABELS, 4, seed=2))},
        class_order=CLASS_ORDER,
        num_experiences=3,
    )


class _Capture:
    """Records the inputs and outputs of the strategy's evaluation forwards."""

    def __init__(self) -> None:
        self.x: list[torch.Tensor] = []
        self.out: list[torch.Tensor] = []

    def after_eval_forward(self, strategy, **kwargs) -> None:
        self.x.append(strategy.mb_x.detach().cpu())
        self.out.append(strategy.mb_output.detach().cpu())


def _strategy(model, plugins=()):
    from avalanche.training.plugins import EvaluationPlugin

    from inflora_avalanche import InfLoRAStrategy

    torch.manual_seed(0)
    return InfLoRAStrategy(
        model=model, lr=1e-2, train_mb_size=16, train_epochs=1, device="cpu", precision="fp32",
        plugins=list(plugins), evaluator=EvaluationPlugin(loggers=[]),
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model trained on 3 experiences; an export after experience 0 and after the last one."""
    from avalanche.core import SupervisedPlugin

    class Capture(_Capture, SupervisedPlugin):
        pass

    torch.manual_seed(0)
    model = InfLoRAViT("vit_tiny_patch16_224", rank=4, **TINY)
    capture = Capture()
    strategy = _strategy(model, [capture])
    bench = _benchmark()
    out = tmp_path_factory.mktemp("export")
    results = {}
    for i, exp in enumerate(bench.train_stream):
        strategy.train(exp)
        if i in (0, 2):
            capture.x.clear()
            capture.out.clear()
            strategy.eval(bench.test_stream)
            path = out / f"after{i}"
            export_timm_checkpoint(model, path, timm_kwargs=TINY, class_names={c: f"class-{c}" for c in LABELS})
            results[i] = (path, torch.cat(capture.x), torch.cat(capture.out))
    return model, strategy, results


@pytest.mark.parametrize("after", [0, 2])
def test_exported_predictions_equal_strategy_predictions(trained, after):
    _, _, results = trained
    path, x, strategy_out = results[after]
    net, meta = load_exported(path)
    assert type(net).__module__.startswith("timm.")
    with torch.no_grad():
        logits = net(x)
    assert logits.shape == strategy_out.shape == (len(x), max(LABELS) + 1)
    assert torch.equal(logits.argmax(1), strategy_out.argmax(1))
    torch.testing.assert_close(logits, strategy_out, rtol=1e-5, atol=1e-4)
    assert meta["column_labels"] == list(range(max(LABELS) + 1))
    learned = CLASS_ORDER[: 2 * (after + 1)]
    assert meta["class_order"] == [c for pair in zip(learned[::2], learned[1::2]) for c in sorted(pair)]
    assert meta["class_names"][5] == "class-5" and meta["class_names"][4] is None
    # Predictions never fall on labels that were not learned yet.
    assert set(logits.argmax(1).tolist()) <= set(learned)


def test_export_in_seen_columns_maps_through_column_labels(trained, tmp_path):
    model, _, results = trained
    _, x, strategy_out = results[2]
    path = tmp_path / "seen"
    meta = export_timm_checkpoint(model, path, timm_kwargs=TINY, columns="seen")
    net, _ = load_exported(path)
    with torch.no_grad():
        cols = net(x).argmax(1)
    assert meta["num_classes"] == len(LABELS)
    assert torch.equal(torch.tensor(meta["column_labels"])[cols], strategy_out.argmax(1))


def test_exported_state_dict_has_plain_timm_keys_and_merged_qkv(trained):
    import timm
    from safetensors.torch import load_file

    model, _, results = trained
    state = load_file(str(results[2][0] / "model.safetensors"))
    plain = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=8, **TINY).state_dict()
    assert set(state) == set(plain)
    for name, adapter in model.adapters():
        assert adapter.merged
        assert torch.equal(state[f"{name}.weight"], adapter.base_layer.weight)
        # The branches changed keys and values only: the query rows are the pretrained ones.
        original = adapter.base_layer.weight[: adapter.row_ranges[0][0]]
        assert torch.equal(state[f"{name}.weight"][: adapter.row_ranges[0][0]], original)


def test_export_of_unmerged_or_open_model_does_not_touch_it(tmp_path):
    torch.manual_seed(0)
    model = InfLoRAViT("vit_tiny_patch16_224", rank=4, **TINY).eval()
    for classes in ([0, 1], [2]):
        model.start_task(classes)
        for _, adapter in model.adapters():
            adapter.set_down(torch.randn(4, 32) / 3)
            adapter.up.data.normal_()
        if classes == [0, 1]:
            model.finish_task()
    model.unmerge()  # finished branch unmerged, second branch open
    before = {k: v.clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    x = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
    export_timm_checkpoint(model, tmp_path / "m", timm_kwargs=TINY)
    after = {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(not a.merged for _, a in model.adapters())
    assert model.task_open
    net, meta = load_exported(tmp_path / "m")
    with torch.no_grad():
        torch.testing.assert_close(net(x), expected, rtol=1e-4, atol=1e-4)
    assert meta["inflora"]["task_open"] is True


def test_merged_qkv_weight_equals_in_place_merge():
    torch.manual_seed(0)
    model = InfLoRAViT("vit_tiny_patch16_224", rank=4, **TINY)
    model.start_task([0])
    for _, adapter in model.adapters():
        adapter.set_down(torch.randn(4, 32))
        adapter.up.data.normal_()
    model.finish_task()
    model.unmerge()
    exported = {name: a.effective_weight().cpu() for name, a in model.adapters()}
    model.merge()
    for name, adapter in model.adapters():
        assert torch.equal(exported[name], adapter.base_layer.weight)


def test_refuses_to_overwrite_and_leaves_no_temporary_files(trained, tmp_path):
    model, _, _ = trained
    path = tmp_path / "m"
    export_timm_checkpoint(model, path, timm_kwargs=TINY)
    first = (path / "model.safetensors").read_bytes()
    with pytest.raises(ValueError, match="already exists"):
        export_timm_checkpoint(model, path, timm_kwargs=TINY)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text("user file")
    with pytest.raises(ValueError, match="already exists"):
        export_timm_checkpoint(model, tmp_path / "other", timm_kwargs=TINY)
    assert (tmp_path / "other" / "config.json").read_text() == "user file"
    assert os.listdir(tmp_path / "other") == ["config.json"]
    export_timm_checkpoint(model, path, timm_kwargs=TINY, overwrite=True)
    assert (path / "model.safetensors").read_bytes() == first
    (path / "README.md").write_text("notes")  # an existing folder may hold other files; they stay
    export_timm_checkpoint(model, path, timm_kwargs=TINY, overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["m", "other"]
    assert sorted(os.listdir(path)) == ["README.md", "config.json", "model.safetensors"]
    umask = os.umask(0)
    os.umask(umask)
    for name in ("model.safetensors", "config.json"):
        assert ((path / name).stat().st_mode & 0o777) == 0o666 & ~umask
    fresh = tmp_path / "nested" / "new"
    export_timm_checkpoint(model, fresh, timm_kwargs=TINY)
    assert (fresh.stat().st_mode & 0o777) == 0o777 & ~umask
    assert sorted(os.listdir(tmp_path / "nested")) == ["new"]


def test_clear_errors(trained, tmp_path):
    model, _, _ = trained
    # A model wrapped around a ready timm module does not know the kwargs that rebuild it: they must be given.
    bare = InfLoRAViT(timm.create_model("vit_tiny_patch16_224", pretrained=False, **TINY), rank=4)
    bare.load_state_dict(model.state_dict())
    with pytest.raises(ValueError, match="timm_kwargs"):
        export_timm_checkpoint(bare, tmp_path / "a", architecture="vit_tiny_patch16_224")
    with pytest.raises(ValueError, match=r"the export is a folder.*'.*a'"):
        export_timm_checkpoint(model, tmp_path / "a.safetensors", timm_kwargs=TINY)
    with pytest.raises(ValueError, match="class_names"):
        export_timm_checkpoint(model, tmp_path / "a", timm_kwargs=TINY, class_names=["x", "y"])
    with pytest.raises(ValueError, match="no task"):
        export_timm_checkpoint(InfLoRAViT("vit_tiny_patch16_224", rank=4, **TINY), tmp_path / "a")
    assert not list(tmp_path.iterdir())
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        export_timm_checkpoint(model, tmp_path / "file", timm_kwargs=TINY)


def test_non_finite_branch_is_refused_naming_the_layer(tmp_path):
    torch.manual_seed(0)
    model = InfLoRAViT("vit_tiny_patch16_224", rank=4, **TINY)
    model.start_task([0, 1])
    for _, adapter in model.adapters():
        adapter.set_down(torch.randn(4, 32))
    model.backbone.blocks[1].attn.qkv.up.data[3, 0] = float("nan")
    with pytest.raises(ValueError, match=r"blocks\.1\.attn\.qkv: exporting would put non-finite values"):
        export_timm_checkpoint(model, tmp_path / "m", timm_kwargs=TINY)
    assert not list(tmp_path.iterdir())


def test_config_is_timms_hub_format(trained):
    model, _, results = trained
    config = json.loads((results[2][0] / "config.json").read_text())
    assert config["architecture"] == "vit_tiny_patch16_224" and config["model_args"] == TINY
    assert config["num_classes"] == config["pretrained_cfg"]["num_classes"] == max(LABELS) + 1
    cfg = config["pretrained_cfg"]
    backbone_cfg = model.backbone.pretrained_cfg
    assert cfg["input_size"] == [3, 32, 32]  # the size it was built for, not the 224 of the pretrained weights
    assert cfg["mean"] == list(backbone_cfg["mean"]) and cfg["std"] == list(backbone_cfg["std"])
    assert cfg["classifier"] == "head" and not any(k in cfg for k in ("url", "hf_hub_id", "file", "source"))
    assert config["label_names"] == config["class_names"] and config["label_names"][5] == "class-5"
    net, _ = load_exported(results[2][0])
    data = timm.data.resolve_model_data_config(net)
    assert data["input_size"] == (3, 32, 32) and tuple(data["mean"]) == tuple(backbone_cfg["mean"])
    assert net.pretrained_cfg["label_names"][5] == "class-5"


# Every loading idiom of docs/export.md, run in a Python that cannot import this package (an import hook refuses
# it, and the interpreter runs isolated from the working directory, the environment and user site-packages).
_IDIOMS = """
import json, sys
class _NoInflora:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "inflora_avalanche":
            raise ImportError("inflora_avalanche must not be needed to load an export")
sys.meta_path.insert(0, _NoInflora())
import timm, torch
from safetensors.torch import load_file

folder, inputs, out = sys.argv[1], sys.argv[2], sys.argv[3]
x = load_file(inputs)["x"]
cfg = json.load(open(f"{folder}/config.json"))
K = cfg["num_classes"]
nets = {
    "local-dir": timm.create_model(f"local-dir:{folder}", pretrained=True),
    "overlay": timm.create_model(
        cfg["architecture"], pretrained=True, **cfg["model_args"],
        pretrained_cfg_overlay=dict(file=f"{folder}/model.safetensors", num_classes=K),
    ),
    "checkpoint_path": timm.create_model(
        cfg["architecture"], num_classes=K, checkpoint_path=f"{folder}/model.safetensors", **cfg["model_args"]
    ),
}
plain = timm.create_model(cfg["architecture"], pretrained=False, num_classes=K, **cfg["model_args"])
plain.load_state_dict(load_file(f"{folder}/model.safetensors"))
nets["load_state_dict"] = plain
with torch.no_grad():
    logits = {name: net.eval()(x) for name, net in nets.items()}
assert not [m for m in sys.modules if m.split(".")[0] == "inflora_avalanche"]
data = timm.data.resolve_model_data_config(nets["local-dir"])
torch.save({"logits": logits, "data": data}, out)
"""


@pytest.mark.parametrize("after", [0, 2])
def test_every_documented_idiom_loads_without_this_package(trained, tmp_path, after):
    from safetensors.torch import save_file

    _, _, results = trained
    path, x, strategy_out = results[after]
    save_file({"x": x.contiguous()}, str(tmp_path / "x.safetensors"))
    script = tmp_path / "load.py"
    script.write_text(textwrap.dedent(_IDIOMS))
    env = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "TMPDIR", "HF_HOME")}
    env["HF_HUB_OFFLINE"] = "1"
    proc = subprocess.run(
        [sys.executable, "-I", str(script), str(path), str(tmp_path / "x.safetensors"), str(tmp_path / "out.pt")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = torch.load(tmp_path / "out.pt", weights_only=False)
    assert set(result["logits"]) == {"local-dir", "overlay", "checkpoint_path", "load_state_dict"}
    for name, logits in result["logits"].items():
        assert torch.equal(logits.argmax(1), strategy_out.argmax(1)), name
        torch.testing.assert_close(logits, strategy_out, rtol=1e-5, atol=1e-4, msg=name)
    assert result["data"]["input_size"] == (3, 32, 32)


def test_single_file_exports_of_earlier_versions_still_load(trained, tmp_path):
    from safetensors.torch import save_file

    model, _, results = trained
    path, x, strategy_out = results[2]
    from safetensors.torch import load_file

    save_file(load_file(str(path / "model.safetensors")), str(tmp_path / "old.safetensors"))
    meta = {"architecture": "vit_tiny_patch16_224", "timm_kwargs": TINY, "num_classes": max(LABELS) + 1}
    (tmp_path / "old.json").write_text(json.dumps(meta))
    net, loaded = load_exported(tmp_path / "old.safetensors")
    assert loaded == meta
    with torch.no_grad():
        torch.testing.assert_close(net(x), strategy_out, rtol=1e-5, atol=1e-4)


def test_dinov2_export_loads_with_timm_alone(tmp_path, shared_weights):
    kwargs = dict(img_size=56, dynamic_img_size=True)
    model = InfLoRAViT("vit_small_patch14_dinov2", rank=4, checkpoint_path=shared_weights, **kwargs).eval()
    torch.manual_seed(0)
    for classes in ([3, 9], [1]):
        model.start_task(classes)
        for _, adapter in model.adapters():
            adapter.set_down(torch.randn(4, adapter.in_features) / 20)
            adapter.up.data.normal_(std=0.05)
        model.finish_task()
    x = torch.randn(4, 3, 56, 56)
    with torch.no_grad():
        expected = model(x)
    meta = export_timm_checkpoint(model, tmp_path / "dino", timm_kwargs=kwargs)
    assert json.loads(Path(tmp_path / "dino" / "config.json").read_text()) == meta
    assert meta["pretrained_cfg"]["input_size"] == [3, 56, 56] and meta["pretrained_cfg"]["fixed_input_size"] is False
    net, _ = load_exported(tmp_path / "dino")
    with torch.no_grad():
        got = net(x)
    assert torch.equal(got.argmax(1), expected.argmax(1))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-3)


def test_the_preprocessing_the_model_was_trained_with_travels_with_the_export(trained, tmp_path):
    """The paper feeds [0, 1] pixels without normalisation: timm's data config of the export must say so, not give
    the backbone's own mean/std (with those, the exported model would see other inputs than in training)."""
    model = trained[0]
    default = export_timm_checkpoint(model, tmp_path / "default", timm_kwargs=TINY)
    plain = {"mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0], "crop_pct": 1.0, "interpolation": "bilinear"}
    export_timm_checkpoint(model, tmp_path / "plain", timm_kwargs=TINY, data_config=plain)
    net = timm.create_model(f"local-dir:{tmp_path / 'plain'}", pretrained=True)
    data = timm.data.resolve_data_config(model=net)
    assert (list(data["mean"]), list(data["std"]), data["crop_pct"], data["interpolation"]) == (
        [0.0, 0.0, 0.0], [1.0, 1.0, 1.0], 1.0, "bilinear")
    assert list(default["pretrained_cfg"]["mean"]) != [0.0, 0.0, 0.0]  # the backbone's own, without data_config
    with pytest.raises(ValueError, match="data_config keys"):
        export_timm_checkpoint(model, tmp_path / "bad", timm_kwargs=TINY, data_config={"normalize": False})


def _one_task(model):
    model.start_task([0, 1])
    model.finish_task()
    return model


def test_export_says_where_the_backbone_weights_came_from(tmp_path):
    """timm keeps the published weights' tag and licence in pretrained_cfg also for a random or locally loaded
    backbone; an export used to carry them as if it had started from those weights."""
    import hashlib

    from safetensors.torch import save_file

    from inflora_avalanche.backbone import weights_source

    published = timm.create_model("vit_tiny_patch16_224", pretrained=False).pretrained_cfg
    assert published["tag"] and published["license"]  # what must not be claimed below
    provenance = ("tag", "license", "origin_url", "paper_ids", "description")

    torch.manual_seed(0)
    random_init = export_timm_checkpoint(_one_task(InfLoRAViT("vit_tiny_patch16_224", rank=4, **TINY)),
                                         tmp_path / "random", timm_kwargs=TINY)
    assert random_init["backbone_weights"] == {"kind": "random init"}
    assert not any(k in random_init["pretrained_cfg"] for k in provenance)

    weights = tmp_path / "local.safetensors"
    save_file(timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, **TINY).state_dict(), weights)
    local = export_timm_checkpoint(_one_task(InfLoRAViT("vit_tiny_patch16_224", rank=4, checkpoint_path=weights,
                                                        **TINY)), tmp_path / "local", timm_kwargs=TINY)
    assert local["backbone_weights"] == {"kind": "file", "path": str(weights.resolve()), "size": weights.stat().st_size,
                                         "sha256": hashlib.sha256(weights.read_bytes()).hexdigest()}
    assert not any(k in local["pretrained_cfg"] for k in provenance)
    assert json.loads((tmp_path / "local" / "config.json").read_text()) == local  # what the file holds

    module = InfLoRAViT(timm.create_model("vit_tiny_patch16_224", pretrained=False, **TINY), rank=4)
    unknown = export_timm_checkpoint(_one_task(module), tmp_path / "module", timm_kwargs=TINY)
    assert unknown["backbone_weights"] == {"kind": "unknown"}
    assert not any(k in unknown["pretrained_cfg"] for k in provenance)

    # timm's published weights (recorded as create_backbone(pretrained=True) records them; no download here)
    model = _one_task(InfLoRAViT("vit_tiny_patch16_224", rank=4, **TINY))
    model.backbone.weights_source = weights_source("vit_tiny_patch16_224", model.backbone, True, None)
    hub = export_timm_checkpoint(model, tmp_path / "hub", timm_kwargs=TINY)
    assert hub["backbone_weights"]["kind"] == "pretrained"
    assert hub["backbone_weights"]["name"] == f"vit_tiny_patch16_224.{published['tag']}"
    assert (hub["pretrained_cfg"]["tag"], hub["pretrained_cfg"]["license"]) == (published["tag"], published["license"])
    for folder in ("random", "local", "module", "hub"):
        load_exported(tmp_path / folder)  # timm still loads every one
