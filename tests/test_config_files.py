"""``--config FILE`` (YAML or JSON settings laid over a preset, under the flags), the resolved ``config.yaml`` a run
writes and reads back, YAML presets, and ``compare --config``. The bad files are in tests/test_reliability.py's
third-round table. All in-process and without training: parsing only."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from inflora_avalanche.run import cli, compare
from inflora_avalanche.run import config as C
from inflora_avalanche.run import presets as P
from inflora_avalanche.run.settings_file import ACTION_KEYS, config_file_text, read_settings_file


def _write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def test_a_config_file_is_laid_over_its_preset_and_under_the_flags(tmp_path):
    yaml_file = _write(tmp_path / "run.yaml", "preset: demo_digits\nlr: 1e-3\nepochs: 1\nseeds: [3, 4]\n")
    config = cli.config_from_argv(["--config", yaml_file])
    assert (config["preset"], config["lr"], config["epochs"], config["seeds"]) == ("demo_digits", 0.001, 1, [3, 4])
    assert config["rank"] == 8  # the rest from the preset
    config = cli.config_from_argv(["-c", yaml_file, "--epochs", "2", "--set", "lr=0.02"])
    assert (config["lr"], config["epochs"], config["seeds"]) == (0.02, 2, [3, 4])  # flags win
    json_file = _write(tmp_path / "run.json", json.dumps({"preset": "demo_digits", "lr": 0.001, "epochs": 1}))
    assert cli.config_from_argv(["-c", json_file])["lr"] == 0.001
    # without a preset key: the command's default preset (or --preset)
    bare = _write(tmp_path / "bare.yaml", "epochs: 4\n")
    assert cli.config_from_argv(["-c", bare, "--preset", "imagenet_r_10", "--data-root", str(tmp_path)],
                                "imagenet_r")["epochs"] == 4
    assert cli.config_from_argv(["-c", bare], "split_cifar100")["preset"] == "cifar100_inflora"
    # the same preset named in both places is fine
    assert cli.config_from_argv(["-c", yaml_file, "--preset", "demo_digits"])["preset"] == "demo_digits"


@pytest.mark.parametrize("argv", [["--demo", "--lr", "0.002", "--seeds", "1", "2"],
                                  ["--demo", "--method", "naive", "--epochs", "1"],
                                  ["--demo", "--method", "ewc", "--set", "ewc_lambda=5.5", "--no-diagnostics"]],
                         ids=["inflora", "naive", "ewc"])
def test_the_written_config_reads_back_to_the_same_config(tmp_path, argv):
    config = cli.config_from_argv([*argv, "--out", str(tmp_path / "run"), "--overwrite"])
    path = tmp_path / "config.yaml"
    path.write_text(config_file_text(config, config["preset"]))
    back = cli.config_from_argv(["--config", str(path)])
    assert back == {**config, **{k: C.DEFAULTS[k] for k in ACTION_KEYS}}
    assert "overwrite" not in read_settings_file(path, "config file")  # never overwrites when read back


def test_a_run_of_a_preset_file_names_the_file_in_its_config(tmp_path, monkeypatch):
    preset = {k: v for k, v in P.load_preset(P.DEMO_PRESET).items() if k != "preset"}
    (tmp_path / "mine.yaml").write_text(json.dumps(preset))  # JSON is YAML
    monkeypatch.chdir(tmp_path)
    config, source = cli.parse_run(["--preset", "mine.yaml", "--epochs", "1"])
    assert config["preset"] == "mine" and source == str(tmp_path / "mine.yaml")
    written = tmp_path / "config.yaml"
    written.write_text(config_file_text(config, source))
    monkeypatch.chdir(Path(__file__).parent)  # read back from elsewhere
    assert cli.config_from_argv(["--config", str(written)]) == config
    assert cli.parse_run(["--demo"])[1] == P.DEMO_PRESET


def test_help_with_a_config_file_shows_its_values_as_the_defaults(tmp_path, capsys):
    path = _write(tmp_path / "run.yaml", "preset: demo_digits\nlr: 0.0123\nrank: 3\n")
    assert cli.run_main(["-c", path, "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "the branches and, unless --head-lr, the head) (default: 0.0123)" in text.split("--lr FLOAT", 1)[1]
    assert "--rank INT rank of each task's branches (default: 3)" in text
    assert "--config FILE" in text


def test_help_with_an_unreadable_preset_is_an_error_not_the_default_presets_values(tmp_path, capsys):
    for preset in ("x.yaml", str(tmp_path / "x.json"), "nope"):
        assert cli.run_main(["--preset", preset, "--help"]) == 2
        captured = capsys.readouterr()
        assert captured.out == "" and captured.err.startswith("error: ") and captured.err.count("\n") == 1
        assert "no such file" in captured.err or "unknown preset 'nope'" in captured.err


def test_yaml_presets_are_read_like_json_presets(tmp_path):
    preset = {k: v for k, v in P.load_preset(P.DEMO_PRESET).items() if k != "preset"}
    json_path = tmp_path / "p.json"
    json_path.write_text(json.dumps(preset))
    yml = tmp_path / "p.yml"
    import yaml

    yml.write_text(yaml.safe_dump(preset))
    assert P.load_preset(str(yml)) == P.load_preset(str(json_path))


def test_yaml_numbers_with_an_exponent_are_numbers(tmp_path):
    path = _write(tmp_path / "n.yaml", "lr: 5e-4\nweight_decay: 1E-5\nlr_scale: .5\ndescription: '1e-3'\n")
    values = read_settings_file(Path(path), "config file")
    assert values == {"lr": 5e-4, "weight_decay": 1e-5, "lr_scale": 0.5, "description": "1e-3"}


def test_compare_takes_a_config_file_for_every_method(tmp_path):
    path = _write(tmp_path / "cmp.yaml", f"epochs: 1\nlr: 2e-3\nout: {tmp_path / 'cmp'}\n")
    _, configs = compare.method_configs(["-c", path, "--methods", "naive", "inflora"])
    assert {m: (c["lr"], c["epochs"], c["out"]) for m, c in configs.items()} == {
        "naive": (0.002, 1, str(tmp_path / "cmp" / "naive")), "inflora": (0.002, 1, str(tmp_path / "cmp" / "inflora"))}
    _, configs = compare.method_configs(["-c", path, "--methods", "naive", "--lr", "0.1", "--out", str(tmp_path / "o")])
    assert configs["naive"]["lr"] == 0.1 and configs["naive"]["out"] == str(tmp_path / "o" / "naive")
    with pytest.raises(C.ConfigError, match="compare runs the methods of --methods: drop method"):
        compare.method_configs(["-c", _write(tmp_path / "m.yaml", "method: naive\n"), "--out", str(tmp_path / "x")])


@pytest.mark.parametrize("text, flags, from_file, from_flags", [
    ("method: ewc\nrank: 3\n", ["--method", "ewc", "--rank", "3"],
     "rank (config file x.yaml) only applies to inflora, inflora_b5, inflora_ca, seq_lora, sd_lora, not ewc: drop it "
     "from the file",
     "--rank only applies to inflora, inflora_b5, inflora_ca, seq_lora, sd_lora, not ewc: drop it"),
    ("method: seq_lora\nlamb: 0.9\nlame: 0.95\n", ["--method", "seq_lora", "--lamb", "0.9", "--lame", "0.95"],
     "lamb (config file x.yaml), lame (config file x.yaml) only apply to inflora, inflora_b5, inflora_ca, not "
     "seq_lora: drop them from the file",
     "--lamb, --lame only apply to inflora, inflora_b5, inflora_ca, not seq_lora: drop them"),
    ("normalize: true\n", ["--normalize"],
     "normalize (config file x.yaml) does nothing for the digits stream (only split_cifar100, imagenet_r, domainnet "
     "and folder read it): drop it from the file",
     "--normalize does nothing for the digits stream (only split_cifar100, imagenet_r, domainnet and folder read "
     "it): drop it"),
    ("mean: [0.5, 0.5, 0.5]\n", ["--mean", "0.5", "0.5", "0.5"],
     "mean (config file x.yaml) only applies with --normalize (pixels are fed as they are without it): add "
     "--normalize or drop it from the file",
     "--mean only applies with --normalize (pixels are fed as they are without it): add --normalize or drop --mean"),
    ("optimizer: sgd\nbetas: [0.9, 0.99]\n", ["--optimizer", "sgd", "--betas", "0.9", "0.99"],
     "betas (config file x.yaml) apply to optimizer adam, not sgd: drop one of them (of timm's optimisers, adamw, "
     "lamb, lion, nadam, ... take them too)",
     "--betas apply to --optimizer adam, not sgd: drop one of them (of timm's optimisers, adamw, lamb, lion, nadam, "
     "... take them too)"),
], ids=["another method's setting", "two of them", "a stream setting", "mean without normalize", "betas with sgd"])
def test_a_refused_setting_is_named_as_it_was_given_in_the_file_or_as_a_flag(tmp_path, capsys, monkeypatch, text,
                                                                            flags, from_file, from_flags):
    """A setting refused because the run would not read it is named as the user gave it: by its key and the config
    file when it came from the file (not by a flag never typed), by its flag when typed; one line, exit 2."""
    monkeypatch.chdir(tmp_path)
    _write(tmp_path / "x.yaml", text)
    for argv, line in ((["-c", "x.yaml"], from_file), (flags, from_flags)):
        code = cli.main(["run", "--demo", *argv, "--out", str(tmp_path / "out")])
        captured = capsys.readouterr()
        assert code == 2 and captured.err == f"error: {line}\n" and not captured.out, (argv, captured.err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.yaml"]
    # a flag given as well as the file's key is named as the flag
    code = cli.main(["run", "--demo", "-c", "x.yaml", *flags, "--out", str(tmp_path / "out")])
    assert code == 2 and capsys.readouterr().err == f"error: {from_flags}\n"


def test_demo_with_a_file_giving_a_data_folder_names_the_key_and_file(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _write(tmp_path / "d.yaml", f"data_root: {tmp_path}\n")
    assert cli.main(["run", "--demo", "-c", "d.yaml", "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == ("error: --demo runs its own offline preset (demo_digits); drop data_root from "
                                       "d.yaml\n")
