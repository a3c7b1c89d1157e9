"""``inflora-avalanche compare``: the table aggregates seeds correctly and names what could not run; the command
writes its table, JSON and plot next to every method's own run, never overwrites a comparison, rejects bad input in
one line, and runs each method in a fresh process by default."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import start_at_once
from inflora_avalanche.results import joint_result, seed_result
from inflora_avalanche.run.compare import aggregate_rows, compare_main, plot_curves, run_metrics, to_markdown

TINY_BACKBONE = {"patch_size": 8, "depth": 2, "embed_dim": 32, "num_heads": 2}
FAST = ["--preset", "synthetic_smoke", "--backbone-kwargs", json.dumps(TINY_BACKBONE), "--resolution", "32",
        "--max-train-per-class", "8", "--max-test-per-class", "4", "--epochs", "1", "--batch-size", "8",
        "--cpu-threads", "1", "--num-workers", "0", "--device", "cpu", "--no-progress"]
#: The table's columns that are measured (wall clock, memory), not computed from the predictions.
MEASURED = ("train_time_s", "peak_memory_mb")


def _compare(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    """``compare_main`` in this process: exit code, stdout and stderr."""
    threads = torch.get_num_threads()
    try:
        code = compare_main(list(argv))
    except SystemExit as exit_:  # user errors leave through fail(): one line, exit code 2
        code = exit_.code
    finally:
        torch.set_num_threads(threads)  # --cpu-threads applies to the whole process
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _table_lines(markdown: str) -> list[str]:
    return [line for line in markdown.splitlines() if line.startswith("|")]


# --------------------------------------------------------------------------------------------------- table
def _seed(seed: int, matrix: list, times: list, memory: float, params: list) -> dict:
    return seed_result(matrix, [10] * len(matrix), seed=seed, train_time_s=times, trainable_params=params,
                       peak_memory_mb=memory, memory_kind="peak RSS")


def _ok(method: str, label: str, *seeds: dict) -> dict:
    return {"method": method, "label": label, "status": "ok", "reason": None, "results": {"seeds": list(seeds)}}


def test_aggregate_gives_mean_and_sample_std_over_seeds() -> None:
    runs = [
        _ok("inflora", "InfLoRA",
            _seed(0, [[80.0, None], [60.0, 40.0]], times=[4.0, 6.0], memory=100.0, params=[10, 12]),
            _seed(1, [[90.0, None], [50.0, 70.0]], times=[5.0, 15.0], memory=120.0, params=[10, 12])),
        _ok("naive", "Naive", _seed(3, [[70.0, None], [30.0, 90.0]], times=[1.0, 1.0], memory=50.0, params=[7, 7])),
        _ok("joint", "Joint", joint_result([[70.0, 90.0]], [10, 10], seed=0, train_time_s=[3.0],
                                           trainable_params=[99], peak_memory_mb=10.0)),
    ]
    inflora, naive, joint = aggregate_rows(runs)
    # A_t per seed: [80, 50] and [90, 60]. A_last: 50, 60; A_avg: 65, 75; forgetting: 80-60=20 and 90-50=40.
    assert inflora["seeds"] == [0, 1] and inflora["status"] == "ok"
    assert inflora["A_last"]["mean"] == pytest.approx(55.0)
    assert inflora["A_last"]["std"] == pytest.approx(math.sqrt(50.0))  # sample std (n - 1)
    assert inflora["A_avg"]["mean"] == pytest.approx(70.0) and inflora["A_avg"]["std"] == pytest.approx(math.sqrt(50))
    assert inflora["forgetting"]["mean"] == pytest.approx(30.0)
    assert inflora["forgetting"]["std"] == pytest.approx(math.sqrt(200.0))
    assert inflora["A_t"] == pytest.approx([85.0, 55.0])
    # Costs: time summed over a seed's experiences (10 and 20 s), parameters of the largest experience, peak memory.
    assert inflora["train_time_s"]["mean"] == pytest.approx(15.0)
    assert inflora["trainable_params"]["mean"] == 12.0 and inflora["trainable_params"]["std"] == 0.0
    assert inflora["peak_memory_mb"]["mean"] == pytest.approx(110.0)
    assert naive["A_last"] == {"mean": 60.0, "std": None, "n": 1}  # one seed: no std
    assert naive["forgetting"]["mean"] == pytest.approx(40.0)
    # Joint training is evaluated once, after all data: an A_last, no A_avg or forgetting.
    assert joint["A_last"]["mean"] == pytest.approx(80.0) and joint["A_avg"] is None and joint["forgetting"] is None
    assert run_metrics(runs[2]["results"]["seeds"][0])["A_avg"] is None

    table = to_markdown([inflora, naive, joint])
    lines = _table_lines(table)
    assert len({line.count("|") for line in lines}) == 1  # every row has every column
    assert "| InfLoRA | 0,1 | 55.00 ± 7.07 | 70.00 ± 7.07 | 30.00 ± 14.14 | 12 | 15 ± 7 | 110 ± 14 |" in lines
    assert "| Naive | 3 | 60.00 | 65.00 | 40.00 | 7 | 2 | 50 |" in lines
    assert "| Joint | 0 | 80.00 | — | — | 99 | 3 | 10 |" in lines


def test_a_method_that_cannot_run_is_listed_with_its_reason(tmp_path: Path) -> None:
    runs = [
        _ok("naive", "Naive", _seed(0, [[40.0]], times=[1.0], memory=5.0, params=[3])),
        {"method": "l2p", "label": "L2P", "status": "n/a", "results": None,
         "reason": "L2P needs a timm VisionTransformer (patch embedding, position embedding, blocks)"},
        {"method": "ewc", "label": "EWC", "status": "error", "results": None,
         "reason": "RuntimeError: boom | bang\nsecond line"},
    ]
    rows = aggregate_rows(runs)
    assert [r["method"] for r in rows] == ["naive", "l2p", "ewc"]  # the given order, none dropped
    assert rows[1]["status"] == "n/a" and rows[1]["seeds"] == [] and "A_last" not in rows[1]
    table = to_markdown(rows)
    lines = _table_lines(table)
    assert len({line.count("|") for line in lines}) == 1
    reason = "L2P needs a timm VisionTransformer (patch embedding, position embedding, blocks)"
    assert f"| L2P | — | n/a: {reason} |" in table
    # A reason may not break the table: its pipes and newlines are neutralised.
    assert "| EWC | — | error: RuntimeError: boom / bang second line |" in table
    plot_curves(rows, tmp_path / "curves.png")  # only the methods that ran are drawn
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------------------------------- command
def test_compare_writes_table_json_plot_and_each_methods_run_and_never_overwrites(tmp_path: Path, capsys) -> None:
    out = tmp_path / "cmp"
    args = ["--out", str(out), "--methods", "linear_probe", "inflora_b5", "--seeds", "0", "1", "--no-isolate", *FAST]
    code, stdout, err = _compare(capsys, *args)
    assert code == 0, err
    data = json.loads((out / "comparison.json").read_text())
    probe, b5 = data["rows"]
    assert (probe["method"], probe["status"], probe["seeds"]) == ("linear_probe", "ok", [0, 1])
    # The row is computed from the method's own run in OUT/<method>/.
    own = json.loads((out / "linear_probe" / "results.json").read_text())
    assert own["method"] == "linear_probe" and own["config"]["out"] == str(out / "linear_probe")
    assert [s["seed"] for s in own["seeds"]] == [0, 1]
    a_last = [s["A_last"] for s in own["seeds"]]
    assert probe["A_last"]["mean"] == pytest.approx(sum(a_last) / 2)
    assert probe["A_last"]["std"] == pytest.approx(abs(a_last[0] - a_last[1]) / math.sqrt(2))
    assert probe["trainable_params"]["mean"] == 32 * 4 + 4  # the linear head only
    assert (out / "linear_probe" / "seed0" / "metrics.json").is_file()
    assert (out / "linear_probe" / "seed1" / "metrics.json").is_file()
    # InfLoRA-b5 adapts five blocks; this ViT has two: listed, with the reason, not dropped.
    assert (b5["method"], b5["status"]) == ("inflora_b5", "n/a")
    assert "adapted_blocks=5" in b5["reason"] and "depth 2" in b5["reason"]
    assert not (out / "inflora_b5" / "results.json").exists()
    assert data["settings"]["epochs"] == 1 and data["settings"]["seeds"] == [0, 1]
    markdown = (out / "comparison.md").read_text()
    lines = _table_lines(markdown)
    assert len(lines) == 4 and len({line.count("|") for line in lines}) == 1
    assert lines[2].startswith("| Linear probe (frozen backbone) | 0,1 | ") and " ± " in lines[2]
    assert lines[3].startswith("| InfLoRA-b5 | — | n/a: cannot build the model: adapted_blocks=5")
    assert lines[2] in stdout  # the table is printed too
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # A second run into the same folder is refused before anything runs, and leaves the comparison as it was.
    code, _, err = _compare(capsys, *args)
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1
    assert "already holds a comparison" in err and "--overwrite" in err
    assert (out / "comparison.md").read_text() == markdown


@pytest.mark.parametrize("argv, needles", [
    (["--methods", "naive", "bogus"], ["unknown method(s) ['bogus']", "linear_probe"]),
    (["--methods", "naive", "naive"], ["names a method twice"]),
    (["--epochs", "0"], ["epochs", ">= 1"]),
    (["--no-such-flag", "1"], ["unrecognized arguments: --no-such-flag 1", "--help"]),
    (["--benchmark", "folder"], ["needs --data-root"]),
    (["--preset", "no_such_preset"], ["unknown preset 'no_such_preset'"]),
    (["--device", "tpu"], ["device must be auto, cpu"]),
])
def test_compare_rejects_bad_input_in_one_line(argv: list, needles: list, tmp_path: Path, capsys) -> None:
    out = tmp_path / "x"
    code, _, err = _compare(capsys, "--out", str(out), *argv)
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, (needle, err)
    assert not out.exists()  # nothing written


def test_compare_needs_an_out_folder(capsys) -> None:
    code, _, err = _compare(capsys, "--methods", "naive")
    assert code == 2 and err == "error: compare needs --out: the folder for every method's run and the table\n"


def test_compare_runs_each_method_in_its_own_process_by_default(tmp_path: Path, capsys) -> None:
    out = tmp_path / "isolated"
    code, _, err = _compare(capsys, "--out", str(out), "--methods", "linear_probe", "inflora", *FAST)
    assert code == 0, err
    rows = json.loads((out / "comparison.json").read_text())["rows"]
    assert [(r["method"], r["status"]) for r in rows] == [("linear_probe", "ok"), ("inflora", "ok")]
    assert [r["trainable_params"]["mean"] for r in rows] == [32 * 4 + 4, 2 * 2 * 32 * 10 + 32 * 2 + 2]
    for row in rows:
        # Each method ran `inflora-avalanche run` on the config compare wrote for it, into its own folder.
        config = json.loads((out / "configs" / f"{row['method']}.json").read_text())
        assert config["method"] == row["method"] and config["out"] == str(out / row["method"])
        results = json.loads((out / row["method"] / "results.json").read_text())
        assert results["preset"] == "synthetic_smoke"  # the comparison's preset, not the name of the config file
        (seed,) = results["seeds"]
        assert row["A_last"]["mean"] == seed["A_last"] and row["A_t"] == seed["A_t"]
    lines = _table_lines((out / "comparison.md").read_text())
    assert lines[2].startswith("| Linear probe (frozen backbone) | 0 | ")
    assert lines[3].startswith("| InfLoRA | 0 | ")
    assert "±" not in "".join(lines[2:])  # one seed: no std

    # The same comparison in this process computes the same table (only the measured costs differ).
    code, _, err = _compare(capsys, "--out", str(tmp_path / "here"), "--methods", "linear_probe", "inflora",
                            "--no-isolate", *FAST)
    assert code == 0, err
    here = json.loads((tmp_path / "here" / "comparison.json").read_text())["rows"]
    strip = lambda row: {k: v for k, v in row.items() if k not in MEASURED}  # noqa: E731
    assert [strip(r) for r in here] == [strip(r) for r in rows]


def test_compare_fails_when_nothing_ran_and_refuses_leftover_method_runs(tmp_path: Path, capsys) -> None:
    # every method not applicable: the table says why, and the exit code is not 0
    code, _, err = _compare(capsys, "--out", str(tmp_path / "none"), "--methods", "inflora_b5", "--no-isolate", *FAST)
    assert code == 1 and "not every method ran" in err and "inflora_b5 n/a" in err
    assert (tmp_path / "none" / "comparison.md").is_file()
    # a crashed comparison left a method's run but no table: refused up front, nothing run or touched
    crashed = tmp_path / "crashed"
    (crashed / "linear_probe").mkdir(parents=True)
    (crashed / "linear_probe" / "config.json").write_text("{}")
    code, out, err = _compare(capsys, "--out", str(crashed), "--methods", "inflora", "linear_probe", "--no-isolate",
                              *FAST)
    assert code == 2 and "already holds runs of linear_probe" in err and "--resume" in err
    assert sorted(p.name for p in crashed.rglob("*")) == ["config.json", "linear_probe"]
    # --demo is run's; compare says so
    code, _, err = _compare(capsys, "--out", str(tmp_path / "demo"), "--demo")
    assert code == 2 and "--demo is for run" in err and not (tmp_path / "demo").exists()


# --------------------------------------------------------------------------------------------------- one folder
def _one_line(code: int, err: str, *needles: str, exit_code: int = 2) -> None:
    assert code == exit_code, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, (needle, err)


def test_a_compare_on_a_folder_another_compare_holds_is_refused(tmp_path: Path, capsys) -> None:
    from inflora_avalanche.run.output import LOCK_NAME, OutputLock

    out = tmp_path / "cmp"
    out.mkdir()
    lock = OutputLock(out).acquire()  # this process stands for a comparison writing into the folder
    try:
        code, _, err = _compare(capsys, "--out", str(out), "--methods", "linear_probe", "--no-isolate", *FAST)
        _one_line(code, err, "error: another run (pid", f"is writing into {out}")
        assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]
    finally:
        lock.release()


def test_two_compares_started_at_once_on_one_out(tmp_path: Path) -> None:
    """They used to both exit 0, the table keeping one of them; now one runs and the other is refused in one line."""
    out = tmp_path / "cmp"
    methods = ("linear_probe", "naive")
    ended = start_at_once([["compare", "--out", str(out), "--methods", method, "--no-isolate", *FAST]
                           for method in methods], tmp_path)
    errors = [err for _, err in ended]
    assert sorted(code for code, _ in ended) == [0, 2], errors
    winner = next(m for m, (code, _) in zip(methods, ended) if code == 0)
    refused = next(err for code, err in ended if code == 2)
    _one_line(2, refused, "another run (pid", f"is writing into {out}")
    rows = json.loads((out / "comparison.json").read_text())["rows"]
    assert [(r["method"], r["status"]) for r in rows] == [(winner, "ok")]
    assert sorted(p.name for p in out.iterdir()) == sorted(["comparison.json", "comparison.md", "curves.png", winner])


def test_compare_export_gives_each_method_its_own_folder(tmp_path: Path, capsys) -> None:
    """Every method used to export into the same seed<N>/after_exp<t>/ folders, the last replacing the others."""
    from safetensors.torch import load_file

    out, export = tmp_path / "cmp", tmp_path / "exports"
    args = ["--out", str(out), "--export", str(export), "--methods", "inflora", "seq_lora", "linear_probe",
            "--no-isolate", *FAST]
    code, _, err = _compare(capsys, *args)
    assert code == 0, err
    assert sorted(p.name for p in export.iterdir()) == ["inflora", "seq_lora"]  # the probe has nothing to export
    weights = {}
    for method in ("inflora", "seq_lora"):
        for t in (1, 2):
            assert (export / method / "seed0" / f"after_exp{t}" / "config.json").is_file()
        weights[method] = load_file(str(export / method / "seed0" / "after_exp2" / "model.safetensors"))
        assert json.loads((out / method / "config.json").read_text())["export"] == str(export / method)
    qkv = "blocks.0.attn.qkv.weight"
    assert not torch.equal(weights["inflora"][qkv], weights["seq_lora"][qkv])  # two trainings, not one export twice
    before = {p: p.read_bytes() for p in export.rglob("*") if p.is_file()}
    # the same --export for another comparison: refused before anything runs, the exports untouched
    code, _, err = _compare(capsys, *args[:1], str(tmp_path / "other"), *args[2:])
    _one_line(code, err, f"--export {export / 'inflora'} already holds exported models")
    assert not (tmp_path / "other").exists()
    assert {p: p.read_bytes() for p in export.rglob("*") if p.is_file()} == before
    # --export with no method that exports: one line
    code, _, err = _compare(capsys, "--out", str(tmp_path / "x"), "--export", str(tmp_path / "e"), "--methods",
                            "naive", *FAST)
    _one_line(code, err, "--export applies to inflora", "none of which is in --methods")


# --------------------------------------------------------------------------------------------------- Ctrl-C
def _wait_for(path: Path, proc: subprocess.Popen, seconds: float = 240) -> None:
    deadline = time.time() + seconds
    while not path.exists():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.005)


def test_ctrl_c_during_compare_is_one_line_exit_130_and_keeps_finished_methods(tmp_path: Path, capsys) -> None:
    """SIGINT while the second method runs (each in its own process): one line instead of a 17-line traceback; the
    first method's results are kept, and --resume finishes the comparison without training it again."""
    out = tmp_path / "cmp"
    argv = ["--out", str(out), "--methods", "linear_probe", "inflora", *FAST]
    proc = subprocess.Popen([sys.executable, "-m", "inflora_avalanche", "compare", *argv], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # as from a terminal
    _wait_for(out / "linear_probe" / "results.json", proc)
    _wait_for(out / "inflora" / "config.json", proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    _one_line(proc.returncode, err, "interrupted during inflora; kept in", "the results of linear_probe",
              "pass --resume with the same --out", exit_code=130)
    assert not (out / "comparison.md").exists() and not (out / ".inflora-run.lock").exists()
    finished = json.loads((out / "linear_probe" / "results.json").read_text())

    code, _, err = _compare(capsys, *argv, "--resume", "--no-isolate")
    assert code == 0, err
    rows = json.loads((out / "comparison.json").read_text())["rows"]
    assert [(r["method"], r["status"]) for r in rows] == [("linear_probe", "ok"), ("inflora", "ok")]
    assert json.loads((out / "linear_probe" / "results.json").read_text())["seeds"] == finished["seeds"]


def test_ctrl_c_before_any_method_finished_removes_what_compare_made(tmp_path: Path, capsys, monkeypatch) -> None:
    from inflora_avalanche.run import loop

    def interrupted(config, *args, **kwargs):
        Path(config["out"]).mkdir(parents=True)  # as the run does, and takes back (no experience had finished)
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, "run_experiment", interrupted)
    out = tmp_path / "new" / "cmp"
    code, _, err = _compare(capsys, "--out", str(out), "--methods", "linear_probe", "inflora", "--no-isolate", *FAST)
    _one_line(code, err, f"interrupted during linear_probe, before any method had finished an experience: nothing to "
                         f"resume, so {out} was removed again", exit_code=130)
    assert not (tmp_path / "new").exists()


def test_compare_resume_with_changed_settings_suggests_what_compare_accepts(tmp_path: Path, capsys) -> None:
    """The refusal of a method's checkpoint trained with other settings used to suggest `--config <out>/<method>/
    config.yaml --resume`, which compare itself refuses (that file names a method)."""
    from inflora_avalanche.run.compare import method_configs

    out = tmp_path / "cmp"
    argv = ["--out", str(out), "--methods", "inflora", *FAST]
    _, configs = method_configs(argv)
    run = out / "inflora"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("method: inflora\n")
    header = json.dumps({"__metadata__": {"state": json.dumps({"config": {**configs["inflora"], "lr": 0.5}})}})
    (run / "checkpoint.safetensors").write_bytes(len(header).to_bytes(8, "little") + header.encode())
    before = sorted(p.name for p in run.iterdir())
    code, _, err = _compare(capsys, *argv, "--resume")
    _one_line(code, err, "trained with other settings (--lr 0.5 there", "drop those flags", "--resume-with-changes")
    assert "--config" not in err, err
    assert sorted(p.name for p in run.iterdir()) == before


def test_a_method_flag_that_no_method_of_methods_reads_is_refused(tmp_path: Path, capsys) -> None:
    """`compare --methods naive linear_probe --rank 4` used to run both methods with --rank doing nothing (as --export
    with no exporting method is refused); with one method that reads it, every method takes what it reads."""
    from inflora_avalanche.run.compare import method_configs

    out = tmp_path / "cmp"
    code, _, err = _compare(capsys, "--out", str(out), "--methods", "naive", "linear_probe", "--rank", "4", *FAST)
    _one_line(code, err, "--rank applies to inflora", "none of which is in --methods: drop it or add one of them")
    assert not out.exists()
    code, _, err = _compare(capsys, "--out", str(out), "--methods", "naive", "--rank", "4", "--ewc-lambda", "5", *FAST)
    _one_line(code, err, "these settings apply to no method of --methods (--ewc-lambda: ewc; --rank: inflora")
    _, configs = method_configs(["--out", str(out), "--methods", "inflora", "naive", "--rank", "4", *FAST])
    assert configs["inflora"]["rank"] == 4 and set(configs) == {"inflora", "naive"}
