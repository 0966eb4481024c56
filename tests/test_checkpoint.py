"""Checkpoints and resume under hostile conditions: unusable LATEST, corrupt checkpoints, killed writes,
plugins that record non-JSON values, two runs on one directory, a full disk."""
from __future__ import annotations

import errno
import fcntl
import json
import logging
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from helpers import TINY, tiny_sets
from ryzen_core import ConfigError, hookimpl
from ryzen_core.checkpoint import CHECKPOINT_DIR, LATEST, find_checkpoint, latest_checkpoint, verify
from ryzen_core.config import load_config
from ryzen_core.errors import WriteError
from ryzen_core.plugins import PluginHost
from ryzen_core.run import load_data
from ryzen_core.rundir import LOCK_FILE, claim_run_directory
from ryzen_core.trainer import Trainer


def make_trainer(cache_dir, run_dir, *extra, host=None, plugins=()):
    config = load_config(overrides=[*TINY, f"data.cache_dir={cache_dir}", *extra])
    return Trainer(config, host or PluginHost(), list(plugins), run_dir, load_data(config))


def losses(trainer):
    return [s["loss"] for s in trainer.metrics.steps]


@pytest.fixture(scope="module")
def trained_once(cache_dir, tmp_path_factory):
    run = tmp_path_factory.mktemp("trained") / "run"
    trainer = make_trainer(cache_dir, run)
    trainer.fit()
    return run, losses(trainer)


@pytest.fixture
def finished_run(trained_once, tmp_path):
    """A copy of a 6-step run with checkpoints at steps 3 and 6, and its loss curve."""
    run, curve = trained_once
    shutil.copytree(run, tmp_path / "run")
    return tmp_path / "run", curve


def test_corrupt_latest_falls_back_to_the_earlier_checkpoint_and_keeps_it(cache_dir, finished_run, caplog):
    run, whole = finished_run
    step6 = run / CHECKPOINT_DIR / "step-000006"
    weights = step6 / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    trainer = make_trainer(cache_dir, run)
    with caplog.at_level(logging.WARNING):
        trainer.fit(resume=True)
    log = caplog.text
    assert "step-000006: model.safetensors is truncated or corrupt (100 bytes" in log and "resuming from" in log
    assert [s["step"] for s in trainer.metrics.steps] == [1, 2, 3, 4, 5, 6]
    assert losses(trainer) == whole  # steps 4-6 trained again from step 3 give the same curve
    kept = run / CHECKPOINT_DIR / "rejected-step-000006" / "model.safetensors"
    assert kept.stat().st_size == 100  # what failed is kept as found, not overwritten
    verify(run / CHECKPOINT_DIR / "step-000006")


def test_no_checkpoint_that_verifies_is_an_error_not_a_fresh_start(ryzen, tmp_path):
    out = tmp_path / "run"
    assert ryzen("train", *tiny_sets(), "--out", str(out)).returncode == 0
    for step in (out / CHECKPOINT_DIR).glob("step-*"):
        (step / "model.safetensors").write_bytes(b"\0" * 100)
    result = ryzen("train", "--resume", str(out))
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"Error: no checkpoint in {out / CHECKPOINT_DIR} verifies (2 tried); the newest: "
                           f"corrupt checkpoint {out / CHECKPOINT_DIR / 'step-000006'}: model.safetensors is truncated")
    assert ryzen("train", "--resume", str(tmp_path / "nothing")).returncode != 0


@pytest.mark.parametrize("spoil", ["missing", "directory", "binary", "absolute", "dotdot", "names a file"])
def test_unusable_latest_resumes_from_the_newest_step_that_verifies(cache_dir, finished_run, tmp_path, spoil,
                                                                    caplog):
    run, whole = finished_run
    root = run / CHECKPOINT_DIR
    elsewhere = tmp_path / "other" / CHECKPOINT_DIR / "step-000099"
    elsewhere.mkdir(parents=True)
    pointer = root / LATEST
    pointer.unlink()
    if spoil == "directory":
        pointer.mkdir()
    elif spoil == "binary":
        pointer.write_bytes(bytes(range(256)) * 4)
    elif spoil == "absolute":
        pointer.write_text(str(elsewhere))
    elif spoil == "dotdot":
        pointer.write_text("../../other/training_checkpoint/step-000099")
    elif spoil == "names a file":
        pointer.write_text("manifest.json")
    with caplog.at_level(logging.WARNING):
        assert find_checkpoint(run).path == root / "step-000006"
    assert "looking for the newest step directory that verifies" in caplog.text
    trainer = make_trainer(cache_dir, run, "train.max_steps=9")
    trainer.resume()
    assert trainer.step == 6  # not a fresh start that would overwrite steps 3 and 6


def test_orphaned_temporary_checkpoints_are_removed_on_the_next_start(cache_dir, finished_run):
    run, _ = finished_run
    root = run / CHECKPOINT_DIR
    (root / ".step-000009.k1ll3d").mkdir()
    (root / ".step-000009.k1ll3d" / "model.safetensors").write_bytes(b"\0" * 10)
    (root / ".LATEST.x7y").write_text("step-000009")
    make_trainer(cache_dir, run, "train.max_steps=6").fit(resume=True)
    assert sorted(p.name for p in root.iterdir()) == [LATEST, "step-000003", "step-000006"]


class RecordsArrays:
    """Records numpy and torch values (fine once converted), then an object JSON cannot hold."""

    @hookimpl
    def on_epoch_end(self, epoch, record):
        record("values", mean=np.float32(0.5), count=np.int64(3), weights=torch.tensor([1.0, 2.0]),
               grid=np.arange(4).reshape(2, 2), step=torch.tensor(7))
        if epoch == 2:
            record("oops", thing=object())


class ReturnsAnObject:
    @hookimpl
    def on_epoch_end(self, epoch):
        return {"lr": torch.tensor(0.1)} if epoch == 1 else {"schedule": object()}


def test_records_are_json_and_a_plugin_recording_an_object_is_disabled(cache_dir, tmp_path):
    host = PluginHost()
    host.register(RecordsArrays(), "arrays")
    host.register(ReturnsAnObject(), "returns")
    trainer = make_trainer(cache_dir, tmp_path, host=host, plugins=["arrays", "returns"])
    result = trainer.fit()
    values = next(e for e in host.events if e.event == "values").data
    assert values == {"mean": 0.5, "count": 3, "weights": [1.0, 2.0], "grid": [[0, 1], [2, 3]], "step": 7}
    assert "PluginError: plugin arrays recorded 'oops' with object at data.thing, which is not JSON" in \
        result.disabled["arrays"]
    assert result.disabled["returns"].startswith("on_epoch_end: returned object at its result.schedule")
    assert result.metrics.adaptations[0]["changes"] == {"lr": pytest.approx(0.1)}
    state = verify(latest_checkpoint(tmp_path))  # the checkpoints were written, with what was recorded
    assert state["step"] == 6 and state["disabled"] == result.disabled


def test_a_locked_run_directory_is_refused(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    with open(run / LOCK_FILE, "w") as held:  # what another ryzen process holds while it writes
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(ConfigError, match="is in use by another ryzen process"):
            claim_run_directory(load_config(overrides=[f"output.dir={run}"]))


def test_a_directory_holding_another_config_is_refused_and_resume_keeps_the_config(ryzen, tmp_path):
    out = tmp_path / "run"
    assert ryzen("train", *tiny_sets("train.max_steps=3"), "--out", str(out)).returncode == 0
    saved = (out / "config.json").read_text()
    other = ryzen("train", *tiny_sets("train.max_steps=3", "train.lr=0.01"), "--out", str(out))
    assert other.returncode == 2
    assert other.stderr.strip().splitlines()[-1] == (
        f"Error: --out {out} holds a run with a different config (train.lr: 0.002 -> 0.01); continue it with "
        f"`ryzen train --resume {out}` or choose another --out")
    changed = ryzen("train", "--resume", str(out), "--set", "train.seed=5")
    assert changed.returncode == 2
    assert "the config differs from the one the run started with (train.seed: 0 -> 5)" in changed.stderr
    assert (out / "config.json").read_text() == saved
    stranger = tmp_path / "photos"
    stranger.mkdir()
    (stranger / "cat.jpg").write_bytes(b"\xff\xd8")
    refused = ryzen("train", *tiny_sets(), "--out", str(stranger))
    assert refused.returncode == 2 and "is not empty and holds no ryzen run" in refused.stderr


def test_full_disk_while_checkpointing_is_one_line_and_keeps_the_last_checkpoint(cache_dir, finished_run,
                                                                                  monkeypatch):
    run, _ = finished_run
    root = run / CHECKPOINT_DIR
    before = {p.name: (p / "model.safetensors").read_bytes() for p in root.glob("step-*")}

    def disk_full(model, filename, *args, **kwargs):
        with open(filename, "wb") as f:
            f.write(b"\0" * 10)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("ryzen_core.checkpoint.save_model", disk_full)
    trainer = make_trainer(cache_dir, run, "train.max_steps=9")
    trainer.resume()
    trainer.step = 9
    with pytest.raises(WriteError) as info:
        trainer.save()
    assert str(info.value) == f"cannot write {root / 'step-000009'}: No space left on device"
    assert info.value.exit_code == 1
    assert {p.name: (p / "model.safetensors").read_bytes() for p in root.glob("step-*")} == before
    assert not [p for p in root.iterdir() if p.name.startswith(".")]
    assert find_checkpoint(run).path.name == "step-000006"


def test_full_disk_through_the_cli_exits_1_with_one_line(cache_dir, tmp_path, monkeypatch):
    from ryzen_core.cli import build_cli

    def disk_full(path, array):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("ryzen_core.data._save_npy", disk_full)
    monkeypatch.setenv("RYZEN_CACHE_DIR", str(tmp_path / "fresh-cache"))  # a miss, so the token cache is written
    result = CliRunner().invoke(build_cli(PluginHost()), ["train", *tiny_sets("train.max_steps=1"),
                                                          "--out", str(tmp_path / "run")], obj={"host": PluginHost()})
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert lines[-1].startswith(f"Error: cannot write {tmp_path / 'fresh-cache' / 'tokens'}")
    assert lines[-1].endswith(".npy: No space left on device")
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_run_config_on_resume_is_compared_without_where_it_writes(tmp_path):
    config = load_config(overrides=[f"output.dir={tmp_path / 'run'}"])
    claim_run_directory(config)
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["output"]["dir"] == str(tmp_path / "run")
    moved = load_config(overrides=[f"output.dir={tmp_path / 'run'}", f"data.cache_dir={tmp_path / 'elsewhere'}"])
    assert claim_run_directory(moved, resume=True) == tmp_path / "run"
