"""`nova train` as a new user meets it (the real command on the tiny checkpoint): the first line says the weights
are random; an existing --out needs --overwrite or --resume; --resume refuses any setting that would change the
run, naming each; a missing adapter folder is said as such."""

from __future__ import annotations

from pathlib import Path

import pytest

COMMON = ("--batch-size", "4", "--lr", "1e-2", "--rank", "4", "--no-progress")


@pytest.fixture
def data(task, tmp_path):
    path = tmp_path / "small.jsonl"
    path.write_text("\n".join(Path(task["train"]).read_text().splitlines()[:8]) + "\n")
    return path


def test_existing_out_needs_overwrite_and_overwrite_replaces_only_a_training_run(run_cli, data, tmp_path):
    out = tmp_path / "adapter"
    code, stdout, stderr = run_cli("train", "--data", data, "--out", out, "--steps", "2", "--checkpoint-every", "1",
                                   *COMMON)
    assert code == 0, stderr
    assert stderr.splitlines()[0].startswith("nova train: warning: the model has RANDOM WEIGHTS"), stderr
    checkpoints = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert checkpoints == ["step-0000001"]

    code, _, stderr = run_cli("train", "--data", data, "--out", out, "--steps", "2", *COMMON)
    assert code == 2
    assert stderr.splitlines()[-1] == (f"nova train: error: --out {out} already exists and is not empty: add "
                                       "--overwrite to replace it, or --resume to continue its run, or choose "
                                       "another folder")
    code, _, stderr = run_cli("train", "--data", data, "--out", out, "--steps", "1", "--overwrite", *COMMON)
    assert code == 0, stderr
    assert not (out / "checkpoints").exists()  # the earlier run's checkpoints went with it
    assert (out / "adapter_model.safetensors").is_file() and '"steps": 1,' in (out / "nova_training.json").read_text()

    (out / "my-notes.txt").write_text("keep me")
    code, _, stderr = run_cli("train", "--data", data, "--out", out, "--steps", "1", "--overwrite", *COMMON)
    assert code == 2 and "--overwrite replaces only what `nova train` wrote, and the folder also holds my-notes.txt" \
        in stderr
    assert (out / "adapter_model.safetensors").is_file()  # nothing was deleted


def test_resume_refuses_every_setting_that_changes_the_run(run_cli, data, tmp_path):
    out = tmp_path / "adapter"
    code, _, stderr = run_cli("train", "--data", data, "--out", out, "--steps", "4", "--checkpoint-every", "2",
                              *COMMON)
    assert code == 0, stderr
    code, _, stderr = run_cli("train", "--data", data, "--out", out, "--steps", "6", "--checkpoint-every", "2",
                              "--batch-size", "2", "--lr", "1e-2", "--rank", "4", "--no-progress", "--resume",
                              "--temperature", "0.1")
    assert code == 2 and "Traceback" not in stderr
    error = stderr.splitlines()[-1]
    assert error.startswith("nova train: error: --resume ") and "settings differ from the checkpoint's" in error
    for named in ("--steps (checkpoint 4, now 6)", "--batch-size (checkpoint 4, now 2)",
                  "--temperature (checkpoint 0.05, now 0.1)"):
        assert named in error
    assert "--checkpoint-every" not in error and "--lr" not in error  # same values, or free to change
    assert error.endswith("resume with the checkpoint's settings, or start over with --overwrite")

    # the same data under another path is the same run; other contents are not
    moved = tmp_path / "moved.jsonl"
    moved.write_text(data.read_text())
    code, stdout, stderr = run_cli("train", "--data", moved, "--out", out, "--steps", "4", "--resume",
                                   "--log-every", "1", *COMMON)
    assert code == 0 and "resumed from" in stdout, stderr
    moved.write_text(data.read_text() + data.read_text().splitlines()[0] + "\n")  # one more triplet
    code, _, stderr = run_cli("train", "--data", moved, "--out", out, "--steps", "4", "--resume", *COMMON)
    assert code == 2 and f"--data (the contents of {moved} changed since the checkpoint)" in stderr


def test_adapter_and_checkpoint_folders_that_do_not_exist(run_cli, data, tmp_path):
    code, _, stderr = run_cli("train", "--data", data, "--out", tmp_path / "a", "--steps", "1",
                              "--init-adapter", "./no/such/adapter", "--no-progress")
    assert code == 2 and stderr.splitlines()[-1] == \
        "nova train: error: --init-adapter: adapter folder not found: ./no/such/adapter"
    code, _, stderr = run_cli("train", "--data", data, "--out", tmp_path / "b", "--steps", "1",
                              "--resume", str(tmp_path / "nowhere"), *COMMON)
    assert code == 2 and stderr.splitlines()[-1] == \
        f"nova train: error: --resume {tmp_path / 'nowhere'}: checkpoint folder not found"
