"""The draft model's run directory: checked when the settings are read, loaded when generation starts.

`speculative.draft_run` names the directory of a `ryzen train` run (or one variant of a `ryzen run`) on
the target's tokenizer. Checked before any work (a bad one is a config error, exit 2): it resolves to a
directory holding exactly one trained model, with the files that model is rebuilt from, and none of
those files leads out of the directory (a symlink to elsewhere is refused: the run directory, not
wherever a link points, is what the user named). When loaded, its tokenizer must be the target's
(the same vocabulary, merges, normalization and pre-tokenization), or drafts would be guesses in another
language.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ryzen_core import ConfigError, latest_checkpoint, load_trained_model, trained_model_dirs

HF_MODEL_DIR = "hf_model"  # where a run keeps a Hugging Face model (ryzen_core's layout)
CONFIG_FILE = "config.json"
# The parts of a tokenizer.json that decide how text becomes ids.
TOKENIZER_PARTS = ("model", "added_tokens", "normalizer", "pre_tokenizer")


def _inside(path: Path, root: Path) -> bool:
    return path.resolve().is_relative_to(root)


def _files_under(directory: Path) -> list[Path]:
    """Every entry below `directory`, links included and not followed."""
    found = []
    for folder, dirs, files in os.walk(directory):
        found += [Path(folder) / name for name in [*dirs, *files]]
    return found


def _needed_files(variant: Path, root: Path) -> list[Path]:
    """What rebuilding the variant's model reads (ryzen_core.load_trained_model's two layouts)."""
    hf_dir = variant / HF_MODEL_DIR
    if (hf_dir / CONFIG_FILE).is_file():
        return [hf_dir, hf_dir / CONFIG_FILE, hf_dir / "tokenizer.json", *_files_under(hf_dir)]
    homes = [variant, root] if variant != root else [root]
    config = next((d / CONFIG_FILE for d in homes if (d / CONFIG_FILE).is_file()), variant / CONFIG_FILE)
    tokenizer = next((d / "tokenizer" for d in homes if (d / "tokenizer").is_dir()), variant / "tokenizer")
    checkpoint = latest_checkpoint(variant)
    files = [config, tokenizer, tokenizer / "tokenizer.json", *_files_under(tokenizer)]
    if checkpoint is not None:
        files += [Path(checkpoint), Path(checkpoint) / "model.safetensors", *_files_under(Path(checkpoint))]
    return files


def check_run_directory(path: Path) -> Path:
    """The resolved run directory, or ValueError (one line) saying why it is not one to draft from."""
    root = Path(path).expanduser().resolve()
    if not root.is_dir():
        raise ValueError(f"{path} is not a directory")
    variants = trained_model_dirs(root)
    if not variants:
        raise ValueError(f"{path} holds no trained model (no {HF_MODEL_DIR}/ or training checkpoint); "
                         "name the directory of a `ryzen train` run")
    if len(variants) > 1:
        raise ValueError(f"{path} holds {len(variants)} models; name one: "
                         f"{', '.join(str(v) for v in variants)}")
    for file in _needed_files(variants[0], root):
        if not file.exists():
            raise ValueError(f"{path} has no {file.relative_to(root)}")
        if not _inside(file, root):
            raise ValueError(f"{file} leads outside {path} (to {file.resolve()}); refused")
    return root


def _tokenizer_identity(tokenizer) -> dict | None:
    to_json = getattr(tokenizer, "to_json", None)
    if to_json is None:
        return None
    saved = json.loads(to_json())
    return {part: saved.get(part) for part in TOKENIZER_PARTS}


def _vocab_size(model: torch.nn.Module) -> int | None:
    config = getattr(getattr(model, "_orig_mod", model), "config", None)
    return getattr(config, "vocab_size", None)


def load_draft_model(run_dir: Path, target: torch.nn.Module, target_tokenizer) -> torch.nn.Module:
    """The draft model of `run_dir` (already checked), in eval mode, in the target's dtype; ConfigError
    when its tokenizer or vocabulary differs from the target's."""
    root = check_run_directory(run_dir)  # again: the directory may have changed since the config was read
    draft, tokenizer, _ = load_trained_model(root)
    mine, theirs = _tokenizer_identity(target_tokenizer), _tokenizer_identity(tokenizer)
    if mine is None:
        raise ConfigError("speculative.draft_run: the target's tokenizer is unknown here, so the draft model's "
                          "cannot be checked against it")
    if mine != theirs:
        differ = [part for part in TOKENIZER_PARTS if mine[part] != theirs[part]]
        raise ConfigError(f"speculative.draft_run: {run_dir} was trained with another tokenizer "
                          f"(its {', '.join(differ)} differ from the target's); train the draft on the same data "
                          "and data.vocab_size")
    if _vocab_size(draft) != _vocab_size(target):
        raise ConfigError(f"speculative.draft_run: the draft model's vocabulary ({_vocab_size(draft)}) is not "
                          f"the target's ({_vocab_size(target)})")
    dtypes = {p.dtype for p in target.parameters() if p.is_floating_point()}
    if len(dtypes) == 1:  # a bf16 target drafts in bf16 too
        draft = draft.to(dtype=dtypes.pop())
    return draft.eval()
