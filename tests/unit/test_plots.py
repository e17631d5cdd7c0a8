"""Learning-curve figures from run directories in the trainer's format, in-process and through the CLI."""

from __future__ import annotations

import contextlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import pytest

from libe_cnn.__main__ import main
from libe_cnn.errors import UserError
from libe_cnn.plots import read_metrics, run_labels, read_run, smooth, write_curves
from tests.conftest import call_main

ROOT = Path(__file__).resolve().parents[2]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def make_run(path: Path, steps: int = 30, eval_every: int = 10, nan_steps: tuple[int, ...] = (),
             truncated: bool = False, **config) -> Path:
    """A run directory as the trainer writes it: config.json and metrics.jsonl (step and eval records)."""
    path.mkdir(parents=True)
    cfg = {"n_workers": 2, "dataset": "fashion-mnist", "batch_size": 64, "lr": 0.001, "optimizer": "adam",
           "strategy": "sync", "wire_dtype": "float32", "epochs": 1, "seed": 1, "sync_period": None,
           "reduce": "sum", "data_dir": "/data", "redis_port": 6379, "run_dir": str(path),
           "run_id": f"lcnn-{path.name}"}
    cfg.update(config)
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    lines = []
    for step in range(1, steps + 1):
        loss = math.nan if step in nan_steps else 2.3 / step
        lines.append(json.dumps({"step": step, "epoch": 0, "loss": loss, "samples": 128 * step,
                                 "wall_s": 0.5 * step, "update_s": 0.01, "compute_s": 0.1}))
        if step % eval_every == 0:
            lines.append(json.dumps({"event": "eval", "step": step, "epoch": 0, "samples": 128 * step,
                                     "test_loss": 1 / step, "test_accuracy": 0.5 + step / 100,
                                     "eval_s": 1.0, "wall_s": 0.5 * step + 0.25}))
    text = "\n".join(lines) + "\n"
    if truncated:
        text += '{"step": 99, "epoch": 0, "lo'  # the run was killed in the middle of a line
    (path / "metrics.jsonl").write_text(text)
    return path


def check_png(path: Path) -> None:
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


def test_one_run_figure_and_its_data(tmp_path):
    run = make_run(tmp_path / "run", steps=30, eval_every=10, nan_steps=(7,), truncated=True)
    out = tmp_path / "curves.png"
    write_curves([run], out)

    check_png(out)
    data = json.loads(out.with_suffix(".json").read_text())
    [entry] = data["runs"]
    assert entry["label"] == "sync, 2 workers x 64, fashion-mnist"
    assert entry["run_dir"] == str(run)
    train, evals = entry["train"], entry["eval"]
    # 30 steps less the NaN one; the truncated last line is not a record.
    assert len(train["step"]) == len(train["wall_s"]) == len(train["loss"]) == len(train["loss_smoothed"]) == 29
    assert 7 not in train["step"] and train["step"][-1] == 30
    assert train["loss"][-1] == pytest.approx(2.3 / 30) and train["wall_s"][-1] == 15.0
    assert entry["smooth_window"] == 5
    assert train["loss_smoothed"][-1] == pytest.approx(sum(2.3 / s for s in range(26, 31)) / 5)
    assert evals["step"] == [10, 20, 30]
    assert evals["wall_s"] == [5.25, 10.25, 15.25]
    assert evals["test_accuracy"][-1] == pytest.approx(0.8)  # a fraction, as in metrics.jsonl


def test_a_run_without_evaluations_still_plots(tmp_path):
    run = make_run(tmp_path / "run", steps=5, eval_every=100)
    write_curves([run], tmp_path / "curves.png")
    check_png(tmp_path / "curves.png")
    assert json.loads((tmp_path / "curves.json").read_text())["runs"][0]["eval"]["step"] == []


def test_labels_name_the_settings_that_differ(tmp_path):
    runs = [read_run(make_run(tmp_path / "a")),
            read_run(make_run(tmp_path / "b", strategy="easgd", n_workers=4, redis_port=7000))]
    # run_dir, run_id and redis_port differ too, but say nothing about the training.
    assert run_labels(runs) == ["strategy=sync, n_workers=2", "strategy=easgd, n_workers=4"]


def test_options_that_follow_from_the_strategy_stay_out_of_the_labels(tmp_path):
    gossip = {"strategy": "gossip", "reduce": None, "sync_period": 4, "gossip_topology": "random"}
    runs = [read_run(make_run(tmp_path / "a", gossip_topology=None)), read_run(make_run(tmp_path / "b", **gossip)),
            read_run(make_run(tmp_path / "c", **{**gossip, "sync_period": 8}))]
    assert run_labels(runs[:2]) == ["strategy=sync", "strategy=gossip"]
    assert run_labels(runs[1:]) == ["sync_period=4", "sync_period=8"]


def saved_config(tmp_path: Path, name: str, **options) -> dict:
    """config.json as the trainer saves it, every field of TrainConfig."""
    from libe_cnn.config import TrainConfig

    return TrainConfig(run_dir=str(tmp_path / name), **options).public_dict()


def saved_run(path: Path, config: dict):
    """A run of make_run's metrics with `config` as its config.json."""
    make_run(path)
    (path / "config.json").write_text(json.dumps(config, indent=2))
    return read_run(path)


def test_labels_leave_out_bookkeeping_and_name_every_setting_that_differs(tmp_path):
    resumed = saved_config(tmp_path, "a", dataset="iris", n_workers=2, resume=True, tensorboard=str(tmp_path / "tb"),
                           checkpoint_every=5, eval_every=3, redis_bind="127.0.0.1")
    capped = saved_config(tmp_path, "b", dataset="iris", n_workers=4, limit_train=60, max_steps=20)
    runs = [saved_run(tmp_path / "a", resumed), saved_run(tmp_path / "b", capped)]
    # A setting left out (null: all samples, no step limit) is a setting; resuming, TensorBoard,
    # checkpoints, how often it evaluated and where Redis listened are not.
    assert run_labels(runs) == ["n_workers=2, limit_train=None, max_steps=None",
                                "n_workers=4, limit_train=60, max_steps=20"]


def test_a_field_saved_only_by_newer_runs_is_the_value_older_runs_trained_with(tmp_path):
    old = saved_config(tmp_path, "a", dataset="iris")
    for name in ("model", "parallelism", "redis_servers", "eval_subset"):
        del old[name]
    runs = [saved_run(tmp_path / "a", old), saved_run(tmp_path / "b", saved_config(tmp_path, "b", dataset="iris", seed=2))]
    assert run_labels(runs) == ["seed=1", "seed=2"]
    runs.append(saved_run(tmp_path / "c", saved_config(tmp_path, "c", dataset="iris", redis_servers=2)))
    assert run_labels(runs) == ["seed=1, redis_servers=1", "seed=2, redis_servers=1", "seed=1, redis_servers=2"]


def test_pipeline_options_follow_from_the_parallelism(tmp_path):
    data = saved_config(tmp_path, "a", n_workers=4, strategy="sync")
    pipeline = saved_config(tmp_path, "b", n_workers=4, strategy="sync", parallelism="pipeline")
    runs = [saved_run(tmp_path / "a", data), saved_run(tmp_path / "b", pipeline)]
    assert run_labels(runs) == ["parallelism=data", "parallelism=pipeline"]


def test_runs_on_different_datasets_are_not_overlaid(tmp_path, run_cli):
    a = make_run(tmp_path / "a", dataset="iris")
    b = make_run(tmp_path / "b", dataset="fashion-mnist")
    c = make_run(tmp_path / "c", dataset="iris")
    with pytest.raises(UserError, match=r"different datasets, iris \(.*a\), fashion-mnist \(.*b\): "):
        write_curves([a, b, c], tmp_path / "abc.png")
    result = run_cli(str(a), str(b), "-o", "ab.png", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith("error: cannot overlay runs on different datasets") and result.stderr.count("\n") == 1
    assert "iris" in result.stderr and "fashion-mnist" in result.stderr
    assert not (tmp_path / "abc.png").exists() and not (tmp_path / "ab.png").exists()
    assert not (tmp_path / "ab.json").exists()


def test_identical_settings_are_told_apart_by_directory(tmp_path):
    runs = [read_run(make_run(tmp_path / "a")), read_run(make_run(tmp_path / "b"))]
    assert run_labels(runs) == ["sync, 2 workers x 64, fashion-mnist (a)", "sync, 2 workers x 64, fashion-mnist (b)"]


def test_smooth_is_a_trailing_mean():
    assert smooth([1.0, 3.0, 5.0, 7.0], window=2) == [1.0, 2.0, 4.0, 6.0]
    assert smooth([], window=5) == []


def test_only_a_damaged_final_line_is_ignored(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 1.0, "wall_s": 0.1}\n{"step": 2, "lo\n{"step": 3, "loss": 1.0, "wall_s": 0.3}\n')
    with pytest.raises(UserError, match="line 2 is not valid JSON"):
        read_metrics(path)


@pytest.mark.parametrize("setup, message", [
    (lambda d: None, "does not exist"),
    (lambda d: d.mkdir(), "has no metrics.jsonl"),
    (lambda d: (d.mkdir(), (d / "metrics.jsonl").write_text('{"step": 1, "lo')), "has no records"),
])
def test_bad_run_directories_are_user_errors(tmp_path, setup, message):
    run = tmp_path / "run"
    setup(run)
    with pytest.raises(UserError, match=message):
        write_curves([run], tmp_path / "curves.png")
    assert not (tmp_path / "curves.png").exists() and not (tmp_path / "curves.json").exists()


def test_output_must_be_a_png_in_an_existing_directory(tmp_path):
    run = make_run(tmp_path / "run")
    with pytest.raises(UserError, match=r"\*\.png"):
        write_curves([run], tmp_path / "curves.json")
    with pytest.raises(UserError, match="does not exist"):
        write_curves([run], tmp_path / "missing" / "curves.png")


def test_one_run_is_plotted_into_its_directory_by_default(tmp_path, capsys):
    run = make_run(tmp_path / "run")
    assert main(["plot", str(run)]) == 0
    check_png(run / "curves.png")
    assert (run / "curves.json").is_file()


def test_argument_errors_are_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["plot"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1


def run_subprocess(*args: str, cwd: Path, umask: int = -1) -> subprocess.CompletedProcess:
    """`python -m libe_cnn plot ARGS` in `cwd`, as a user types it; umask -1 leaves this process's own."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "libe_cnn", "plot", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120, umask=umask)


@pytest.fixture
def run_cli(capsys):
    """The same command run in this process (the subprocess test shows they agree): main() in `cwd`."""
    def run_(*args: str, cwd: Path) -> subprocess.CompletedProcess:
        with contextlib.chdir(cwd):
            return call_main(main, ["plot", *args], capsys)
    return run_


def files(*dirs: Path) -> dict[Path, bytes]:
    """Every file under the directories, with its bytes: to show that nothing was written or changed."""
    return {p: p.read_bytes() for d in dirs for p in sorted(d.rglob("*")) if p.is_file()}


def test_cli_overlays_two_runs(tmp_path):
    a = make_run(tmp_path / "a", steps=40, eval_every=20)
    b = make_run(tmp_path / "b", steps=25, eval_every=5, strategy="easgd", n_workers=4)
    work = tmp_path / "work"
    work.mkdir()

    result = run_subprocess(str(a), str(b), "-o", "overlay.png", cwd=work)

    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    check_png(work / "overlay.png")
    data = json.loads((work / "overlay.json").read_text())
    assert [r["label"] for r in data["runs"]] == ["strategy=sync, n_workers=2", "strategy=easgd, n_workers=4"]
    assert [len(r["train"]["step"]) for r in data["runs"]] == [40, 25]
    assert [len(r["eval"]["step"]) for r in data["runs"]] == [2, 5]
    assert data["runs"][1]["eval"]["test_accuracy"][-1] == pytest.approx(0.75)


def test_cli_error_is_one_line_and_exit_2(tmp_path, run_cli):
    result = run_cli(str(tmp_path / "nowhere"), "-o", str(tmp_path / "curves.png"), cwd=tmp_path)

    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    assert "does not exist" in result.stderr
    assert not (tmp_path / "curves.png").exists()


@pytest.mark.parametrize("where", ["elsewhere", "inside a run"])
def test_cli_several_runs_without_output_write_nothing(tmp_path, run_cli, where):
    a, b = make_run(tmp_path / "a"), make_run(tmp_path / "b", strategy="easgd")
    (a / "curves.png").write_bytes(PNG_SIGNATURE)  # run a's own figure, as the trainer leaves it
    work = tmp_path / "work"
    work.mkdir()
    before = files(tmp_path)

    result = run_cli(str(a), str(b), cwd=a if where == "inside a run" else work)

    assert result.returncode == 2
    assert result.stderr.startswith("error: several runs: ") and result.stderr.count("\n") == 1
    assert "-o OUT.png" in result.stderr
    assert result.stdout == ""
    assert files(tmp_path) == before  # no curves.* in the working directory; run a's byte for byte


@pytest.mark.parametrize("plotted, output", [
    ("a b", "a/curves.png"),   # an overlay is not run a's figure
    ("a b", "c/curves.png"),   # nor that of a run it does not show
    ("a", "b/curves.png"),     # one run into another run's directory
    ("a b", "a/curves.PNG"),   # the same file on a case-insensitive file system
    ("a", "a/config.png"),     # its JSON would be the run's config.json
    ("a", "b/summary.png"),
])
def test_cli_refuses_to_replace_a_runs_files(tmp_path, run_cli, plotted, output):
    for name in "abc":
        run = make_run(tmp_path / name)
        (run / "curves.png").write_bytes(PNG_SIGNATURE)  # each run's own figure (what it holds does not matter)
        (run / "summary.json").write_text('{"completed": true}\n')
    before = files(tmp_path)

    result = run_cli(*(str(tmp_path / name) for name in plotted.split()), "-o", str(tmp_path / output), cwd=tmp_path)

    assert result.returncode == 2
    assert result.stderr.startswith("error: cannot write ") and result.stderr.count("\n") == 1
    assert "which is left alone" in result.stderr
    assert files(tmp_path) == before


@pytest.mark.parametrize("umask", [0o022, 0o027], ids=["022", "027"])
def test_cli_one_run_refreshes_its_own_figure_with_the_usual_mode(tmp_path, umask):
    # A subprocess: the umask is process-wide, and libe_cnn.rundir reads it once, at import.
    run = make_run(tmp_path / "run")
    work = tmp_path / "work"
    work.mkdir()

    result = run_subprocess(str(run), cwd=work, umask=umask)  # no -o: the run's own curves.png

    assert result.returncode == 0, result.stderr
    check_png(run / "curves.png")
    assert list(work.iterdir()) == []
    for name in ("curves.png", "curves.json"):  # as open() makes them, not mkstemp's 0600
        assert (run / name).stat().st_mode & 0o777 == 0o666 & ~umask
    # Naming its own figure explicitly, from inside the run, is allowed too.
    result = run_subprocess(str(run), "-o", "curves.png", cwd=run, umask=umask)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in run.iterdir()) == ["config.json", "curves.json", "curves.png", "metrics.jsonl"]
