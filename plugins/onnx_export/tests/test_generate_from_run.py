"""`ryzen generate` given a run directory: it names what it could use, and generates in torch from the
run's trained model (`--run`)."""
from __future__ import annotations

import json
import shutil

import click
import pytest
import torch
from click.testing import CliRunner

from ryzen_core import Tokenizer, build_model, generate, latest_checkpoint, load_weights
from ryzen_core.testing import make_config, make_host, train_run_tiny
from ryzen_plugin_onnx_export import plugin


def ryzen_generate(*args: str):
    @click.group()
    def cli():
        pass

    plugin.register_commands(cli)
    return CliRunner().invoke(cli, ["generate", *args])


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, ryzen_cache_dir):
    config = make_config(ryzen_cache_dir, out_dir=tmp_path_factory.mktemp("generate") / "run")
    return train_run_tiny(make_host(), config), config


def test_generate_from_a_run_directory_in_torch_matches_the_checkpoint(trained_run):
    run_dir, config = trained_run
    result = ryzen_generate("--run", str(run_dir), "def parse", "--max-new-tokens", "6")
    assert result.exit_code == 0, result.output
    tokenizer = Tokenizer.load(run_dir / "tokenizer")
    model = build_model(config.model, tokenizer.vocab_size)
    load_weights(model, latest_checkpoint(run_dir))
    expected = generate(model.eval(), torch.tensor([tokenizer.encode("def parse")]), 6, eos_token_id=tokenizer.eos_id)
    assert result.stdout.rstrip("\n") == tokenizer.decode(expected[0].tolist())


def test_a_run_directory_given_as_an_export_names_the_exports_and_the_torch_option(trained_run, tmp_path):
    run_dir, _ = trained_run
    plain = ryzen_generate("--onnx", str(run_dir), "def")
    assert plain.exit_code == 2 and plain.stderr.count("\n") == 1
    assert "is not an onnx export" in plain.stderr and f"--run {run_dir}" in plain.stderr
    with_export = tmp_path / "run"
    shutil.copytree(run_dir, with_export)
    (with_export / "export" / "onnx-int8").mkdir(parents=True)
    (with_export / "export" / "onnx-int8" / "export.json").write_text(json.dumps({"format": "ryzen-onnx"}))
    named = ryzen_generate("--onnx", str(with_export), "def")
    assert named.exit_code == 2 and f"exports under it: {with_export / 'export' / 'onnx-int8'}" in named.stderr


def test_a_run_with_several_models_is_refused_with_their_names_and_one_of_them_works(trained_run, tmp_path):
    run_dir, _ = trained_run
    several = tmp_path / "run"
    several.mkdir()
    shutil.copy(run_dir / "config.json", several / "config.json")
    for variant in ("baseline", "optimized"):
        shutil.copytree(run_dir / "training_checkpoint", several / variant / "training_checkpoint")
        shutil.copytree(run_dir / "tokenizer", several / variant / "tokenizer")
    refused = ryzen_generate("--run", str(several), "def")
    assert refused.exit_code == 2 and refused.stderr.count("\n") == 1
    assert f"holds 2 models; choose one: {several / 'baseline'}, {several / 'optimized'}" in refused.stderr
    chosen = ryzen_generate("--run", str(several / "optimized"), "def parse", "--max-new-tokens", "6")
    direct = ryzen_generate("--run", str(run_dir), "def parse", "--max-new-tokens", "6")
    assert chosen.exit_code == 0 and chosen.stdout == direct.stdout
    neither = ryzen_generate("def")
    assert neither.exit_code == 2 and "either --onnx EXPORT_DIR or --run RUN_DIR" in neither.stderr
