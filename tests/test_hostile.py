"""Malformed and hostile input, one case per line: every case must end in one short line that names
the problem (a RyzenError with its exit code), never a traceback, a hang or a wrong result.

A case is (kind, payload, expected text in the message, exit code). `kind` says where the payload
goes; the functions in RUNNERS put it there and call the code that must refuse it.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch

from ryzen_core.checkpoint import load_checkpoint, save_checkpoint, verify
from ryzen_core.config import check_model_fits_data, load_config
from ryzen_core.data import MAX_FILE_BYTES, load_documents
from ryzen_core.errors import RyzenError
from ryzen_core.rundir import claim_run_directory

MAX_MESSAGE = 400  # characters: an error line a person can read, whatever the input held

STATE = {"label": "train", "step": 3, "micro_batches": 3, "elapsed": 0.5, "best_val": None, "evals_since_best": 0,
         "metrics": {"steps": [], "evals": [], "anomalies": [], "adaptations": []}, "disabled": {}, "events": [],
         "plugin_settings": {}}


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Linear(4, 3)


def _checkpoint(run_dir: Path) -> Path:
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    trainer_state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                     "torch_rng": torch.get_rng_state()}
    return save_checkpoint(run_dir, 3, model, trainer_state, STATE)


def _flip_a_weight_bit(step: Path) -> None:
    weights = step / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01
    weights.write_bytes(bytes(data))


def manifest(tmp_path: Path, text: str) -> None:
    """A checkpoint whose weights were tampered with and whose manifest was replaced by `text`."""
    step = _checkpoint(tmp_path)
    _flip_a_weight_bit(step)
    (step / "manifest.json").write_text(text)
    load_checkpoint(step, _model())


def manifest_without(tmp_path: Path, name: str) -> None:
    step = _checkpoint(tmp_path)
    entries = json.loads((step / "manifest.json").read_text())
    del entries[name]
    (step / "manifest.json").write_text(json.dumps(entries))
    load_checkpoint(step, _model())


def flipped(tmp_path: Path, name: str) -> None:
    """One bit of a checkpoint file flipped, the manifest as written."""
    step = _checkpoint(tmp_path)
    data = bytearray((step / name).read_bytes())
    data[len(data) // 2] ^= 0x10
    (step / name).write_bytes(bytes(data))
    load_checkpoint(step, _model())


def state(tmp_path: Path, text: str) -> None:
    """A checkpoint whose state.json is `text`, with a manifest that vouches for it (written by someone)."""
    step = _checkpoint(tmp_path)
    (step / "state.json").write_text(text)
    entries = json.loads((step / "manifest.json").read_text())
    entries["state.json"] = {"bytes": len(text.encode()), "sha256": hashlib.sha256(text.encode()).hexdigest()}
    (step / "manifest.json").write_text(json.dumps(entries))
    verify(step)


def out_dir(tmp_path: Path, where: str) -> None:
    (tmp_path / "a-file").write_text("x")
    claim_run_directory(load_config(overrides=[f"output.dir={where.replace('{tmp}', str(tmp_path))}"]))


def set_value(tmp_path: Path, assignment: str) -> None:
    load_config(overrides=[assignment])


def model_sizes(tmp_path: Path, assignments: str) -> None:
    check_model_fits_data(load_config(overrides=assignments.split()))


def config_file(tmp_path: Path, content: bytes | str) -> None:
    path = tmp_path / "run.yaml"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    load_config(path)


def jsonl(tmp_path: Path, line: str) -> None:
    path = tmp_path / "corpus.jsonl"
    path.write_text('{"text": "a fine line"}\n' + line + "\n", encoding="utf-8")
    load_documents(path)


def data_source(tmp_path: Path, what: str) -> None:
    path = tmp_path / "corpus.txt"
    if what == "fifo":
        os.mkfifo(path)
    elif what == "big":
        with open(path, "wb") as f:
            f.truncate(MAX_FILE_BYTES + 1)  # sparse: costs no disk
    else:
        path.symlink_to(what)
    load_config(overrides=[f"data.source={path}"])
    load_documents(path)


BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{n}: &{n} [{', '.join(['*' + p] * 9)}]\n" for p, n in zip("abcdefgh", "bcdefghi")) + "train: {lr: *i}\n"

RUNNERS = {f.__name__: f for f in (manifest, manifest_without, flipped, state, out_dir, set_value, model_sizes,
                                   config_file, jsonl, data_source)}

CASES = [
    # checkpoints: the manifest must vouch, with size and sha256, for every file the loader reads
    ("manifest", "{}", "manifest.json has no entry for model.safetensors", 1),
    ("manifest", "[]", "corrupt checkpoint", 1),
    ("manifest", "7", "corrupt checkpoint", 1),
    ("manifest", "null", "corrupt checkpoint", 1),
    ("manifest", '{"model.safetensors": {"bytes": 10}}', "model.safetensors.sha256: Field required", 1),
    ("manifest", '{"model.safetensors": []}', "corrupt checkpoint", 1),
    ("manifest", '{"../../etc/passwd": {"bytes": 1, "sha256": "' + "0" * 64 + '"}}', "unexpected file", 1),
    ("manifest", "\xff\xfe not json", "manifest.json is not readable JSON", 1),
    ("manifest", "[" * 100_000, "manifest.json is not readable JSON", 1),
    ("manifest_without", "model.safetensors", "manifest.json has no entry for model.safetensors", 1),
    ("manifest_without", "state.json", "manifest.json has no entry for state.json", 1),
    ("flipped", "model.safetensors", "model.safetensors does not match its sha256", 1),
    ("flipped", "trainer_state.pt", "trainer_state.pt does not match its sha256", 1),
    ("state", "{}", "state.json does not have the trainer's schema", 1),
    ("state", "[]", "state.json does not have the trainer's schema", 1),
    ("state", "3", "state.json does not have the trainer's schema", 1),
    ("state", json.dumps(dict(STATE, step="3")), "step: Input should be a valid integer", 1),
    ("state", json.dumps({k: v for k, v in STATE.items() if k != "metrics"}), "metrics: Field required", 1),
    ("state", json.dumps(dict(STATE, events=[{"plugin": 1}])), "state.json does not have the trainer's schema", 1),
    # --out must be a directory this process can create and write in
    ("out_dir", "{tmp}/a-file", "is not a directory", 2),
    ("out_dir", "/proc/ryzen-cannot-be-here", "cannot create the run directory", 2),
    # config values: ranges and finiteness, checked before any work
    ("set_value", "train.threads=100000000", "train.threads: 100000000 is more than 4 x the", 2),
    ("set_value", "validate.threads=5000", "validate.threads: 5000 is more than 4 x the", 2),
    ("set_value", "model.d_model=44444444444444", "model.d_model: Input should be less than or equal to 65536", 2),
    ("set_value", "train.seed=123456789012345678901234567890", "train.seed: Input should be less than or equal", 2),
    ("set_value", "train.seed=-1", "train.seed: Input should be greater than or equal to 0", 2),
    ("set_value", "model.context_length=1", "model.context_length: Input should be greater than or equal to 2", 2),
    ("set_value", "train.weight_decay=.inf", "train.weight_decay: Input should be a finite number", 2),
    ("set_value", "train.lr=.nan", "train.lr: Input should be a finite number", 2),
    ("set_value", "train.max_seconds=.inf", "train.max_seconds: Input should be a finite number", 2),
    ("set_value", f"train.max_steps={10 ** 41}", "train.max_steps: Input should be less than or equal to", 2),
    ("set_value", "data.seq_len=" + "9" * 5000, "data.seq_len: Unable to parse input string as an integer", 2),
    ("config_file", "data: {seq_len: " + "9" * 5000 + "}", "is not valid YAML: Exceeds the limit (4300 digits)", 2),
    ("set_value", "train.lr=" + "x" * 100_000, "(100,002 characters)", 2),
    ("set_value", "train." + "k" * 100_000 + "=1", "unknown key", 2),
    ("set_value", "x" * 100_000, "--set expects section.key=value", 2),
    ("model_sizes", "model.d_model=65536 model.n_layers=1000", "parameters needs at least", 2),
    ("model_sizes", "model.preset=tiny data.seq_len=4096", "data.seq_len (4096) exceeds the model's context", 2),
    # config files: size, encoding, alias bombs, nesting
    ("config_file", BOMB, "YAML aliases expand to more than 100,000 values", 2),
    ("config_file", "a: &a [*a]\n", "a YAML alias refers to itself", 2),
    ("config_file", "train: {lr: 0.1}\n".encode("utf-16"), "not UTF-8 text (byte 0) (it starts with a UTF-16", 2),
    ("config_file", b"train: {lr: \xe9}\n", "is not UTF-8 text (byte 12)", 2),
    ("config_file", "[" * 100_000, "nests values too deeply", 2),
    ("config_file", "# " + "x" * (1 << 20) + "\n", "a config is at most 1,048,576", 2),
    # data: one line per bad record or file, never a hang or a MemoryError
    ("jsonl", "[" * 100_000 + "]" * 100_000, "line 2: JSON nested too deeply", 2),
    ("jsonl", '{"text": "half a pair \\ud800 here"}', "line 2: field 'text' holds a lone surrogate (\\ud800)", 2),
    ("data_source", "fifo", "is not a regular file or a directory", 2),
    ("data_source", "/dev/zero", "is not a regular file or a directory", 2),
    ("data_source", "big", "corpus files are read whole, at most 1,073,741,824 bytes", 2),
]


@pytest.mark.parametrize("kind, payload, expected, exit_code", CASES,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_hostile_input_is_one_clear_line(tmp_path, kind, payload, expected, exit_code):
    with pytest.raises(RyzenError) as info:
        RUNNERS[kind](tmp_path, payload)
    message = str(info.value)
    assert expected in message
    assert "\n" not in message and len(message) <= MAX_MESSAGE
    assert info.value.exit_code == exit_code
