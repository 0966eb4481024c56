"""Corpora, document splits, byte-level BPE tokenizer, token packing and batch sampling.

The pipeline is `prepare_data`: load documents -> split by document -> train (or load)
a tokenizer on the train split -> tokenize each split (cached) -> pack into fixed windows.
Everything is deterministic for a given corpus so runs on different machines with the
same Python see the same data, and everything expensive is cached under `cache_dir`
keyed by a hash of its inputs.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import stat
import sysconfig
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import tokenizers
import torch
from tokenizers import decoders, models, pre_tokenizers, trainers

from .errors import RyzenError, writing

logger = logging.getLogger(__name__)

STDLIB_SOURCE = "stdlib"
EOS_TOKEN = "<|endoftext|>"
TEXT_SUFFIXES = frozenset({".txt", ".md", ".py"})
STDLIB_EXCLUDED_DIRS = frozenset({"site-packages", "test", "tests", "idle_test"})
# Bump when the meaning of a cached artifact changes (trainer settings, token layout).
CACHE_FORMAT_VERSION = 1
# Byte-level BPE needs the 256 byte symbols plus the end-of-text token.
MIN_VOCAB_SIZE = 257
# Documents are encoded in chunks of about this many characters so the intermediate
# Python lists stay small while encode_batch still has work to spread over threads.
ENCODE_CHUNK_CHARS = 2_000_000
# A corpus file is read whole into memory; above this it is refused with a message, not a MemoryError.
MAX_FILE_BYTES = 1 << 30
# A single text file, or a corpus of fewer than MIN_DOCUMENTS documents, is cut into documents of
# consecutive blank-line paragraphs up to this many characters (a longer paragraph is cut at it).
TEXT_DOCUMENT_CHARS = 4096
MIN_DOCUMENTS = 3  # one each for train, validation and test
PARAGRAPH_BREAK = re.compile(r"\n[ \t\r\f\v]*\n")


class DataError(RyzenError, ValueError):
    """A problem with the user's data (path, format, size); the message is one line."""

    exit_code = 2  # a config mistake: the data the user pointed at


# ---------------------------------------------------------------------------
# Corpora


@dataclass(frozen=True)
class Document:
    id: str
    text: str


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_source_files() -> list[Path]:
    """The running interpreter's own standard-library `.py` files, sorted by relative path."""
    root = stdlib_root()
    if not root.is_dir():
        raise DataError(f"standard library directory {root} not found")
    found: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in STDLIB_EXCLUDED_DIRS]
        for name in filenames:
            if name.endswith(".py"):
                path = Path(dirpath) / name
                found.append((path.relative_to(root).as_posix(), path))
    # Sort on the posix relative path, not on Path objects, so the order is the same everywhere.
    found.sort(key=lambda item: item[0])
    return [path for _, path in found]


def load_documents(
    source: str | Path, text_field: str = "text", max_documents: int | None = None
) -> list[Document]:
    """Load a corpus. The string "stdlib" means the embedded standard-library corpus;
    a Path (or any other string) is a text file, a directory or a `.jsonl` file.

    Blank documents are skipped; `max_documents` keeps the first N in corpus order.
    """
    if max_documents is not None and max_documents < 1:
        raise DataError(f"max_documents must be at least 1, got {max_documents}")
    if isinstance(source, str) and source == STDLIB_SOURCE:
        documents = _take(_stdlib_documents(), max_documents)
        described = f"standard library at {stdlib_root()}"
    else:
        path = Path(source)
        if not path.exists():
            raise DataError(f"data source {path} does not exist")
        if path.is_dir():
            documents = _take(_directory_documents(path), max_documents)
        else:
            _check_regular_file(path)
            if path.suffix.lower() == ".jsonl":
                documents = _take(_jsonl_documents(path, text_field), max_documents)
            else:
                documents = _take(_text_file_documents(path), max_documents)
        described = str(path)
    if not documents:
        raise DataError(f"data source {described} contains no non-empty documents")
    logger.info("loaded %d documents (%d characters) from %s",
                len(documents), sum(len(d.text) for d in documents), described)
    return documents


def _take(documents: Iterator[Document], limit: int | None) -> list[Document]:
    taken: list[Document] = []
    for document in documents:
        taken.append(document)
        # Stop before pulling the next document so nothing past the limit is read or checked.
        if limit is not None and len(taken) >= limit:
            break
    return taken


def _stdlib_documents() -> Iterator[Document]:
    root = stdlib_root()
    for path in stdlib_source_files():
        # Universal newlines + "replace" keep the corpus identical on every machine with
        # the same Python, whatever odd bytes a stdlib file might carry.
        with open(path, encoding="utf-8", errors="replace") as handle:
            text = handle.read()
        if text.strip():
            yield Document(path.relative_to(root).as_posix(), text)


def _is_regular_file(path: Path) -> bool:
    """A regular file reached without a symlink: FIFOs hang, devices never end, links lead elsewhere."""
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def _check_regular_file(path: Path) -> None:
    try:
        info = os.stat(path)  # the source the user named may be a link, but to a regular file
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}") from None
    if not stat.S_ISREG(info.st_mode):
        raise DataError(f"data source {path} is not a regular file or a directory (a FIFO or a device?)")
    if info.st_size > MAX_FILE_BYTES:
        raise DataError(f"{path} is {info.st_size:,} bytes; corpus files are read whole, at most "
                        f"{MAX_FILE_BYTES:,} bytes each: split it into several files")


def paragraph_documents(name: str, text: str, limit: int = TEXT_DOCUMENT_CHARS) -> list[Document]:
    """`text` cut into documents `name#0`, `name#1`, ... of consecutive blank-line paragraphs, each up
    to `limit` characters; a paragraph longer than that is cut every `limit` characters."""
    ends = [m.end() for m in PARAGRAPH_BREAK.finditer(text)] + [len(text)]
    pieces, start, last = [], 0, 0
    for end in ends:
        if end - start > limit and last > start:
            pieces.append(text[start:last])
            start = last
        last = end
    pieces.append(text[start:])
    cut = [piece[i: i + limit] for piece in pieces for i in range(0, len(piece), limit)]
    return [Document(f"{name}#{i}", piece) for i, piece in enumerate(p for p in cut if p.strip())]


def _read_text(path: Path) -> str:
    _check_regular_file(path)
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.read()
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not valid UTF-8 (byte {exc.start})") from None
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}") from None


def _text_file_documents(path: Path) -> Iterator[Document]:
    yield from paragraph_documents(path.name, _read_text(path))


def _directory_documents(root: Path) -> Iterator[Document]:
    found: list[tuple[str, Path]] = []
    skipped = 0
    for dirpath, dirnames, filenames in os.walk(root):
        # Hidden directories (.git, .venv, ...) are tooling, not corpus.
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            path = Path(dirpath) / name
            if not name.startswith(".") and path.suffix.lower() in TEXT_SUFFIXES:
                if _is_regular_file(path):
                    found.append((path.relative_to(root).as_posix(), path))
                else:
                    skipped += 1
    if skipped:
        logger.warning("skipped %d entries of %s that are not regular files (symlinks, FIFOs, devices)", skipped, root)
    found.sort(key=lambda item: item[0])
    for relative, path in found:
        text = _read_text(path)
        if text.strip():
            # Ids relative to the directory keep the split stable if the directory moves.
            yield Document(relative, text)


def _jsonl_documents(path: Path, text_field: str) -> Iterator[Document]:
    try:
        handle = open(path, encoding="utf-8")
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}") from None
    with handle:
        line_number = 0
        try:
            for line_number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path} line {line_number}: invalid JSON ({exc.msg})") from None
                except RecursionError:
                    raise DataError(f"{path} line {line_number}: JSON nested too deeply") from None
                if not isinstance(record, dict):
                    raise DataError(f"{path} line {line_number}: expected a JSON object, "
                                    f"got {type(record).__name__}")
                if text_field not in record:
                    raise DataError(f"{path} line {line_number}: missing text field {text_field!r}")
                text = record[text_field]
                if not isinstance(text, str):
                    raise DataError(f"{path} line {line_number}: field {text_field!r} is "
                                    f"{type(text).__name__}, not a string")
                try:
                    text.encode("utf-8")
                except UnicodeEncodeError as exc:
                    raise DataError(f"{path} line {line_number}: field {text_field!r} holds a lone surrogate "
                                    f"(\\u{ord(text[exc.start]):04x}), which is not text") from None
                if text.strip():
                    yield Document(f"{path.name}:{line_number}", text)
        except UnicodeDecodeError as exc:
            raise DataError(f"{path} line {line_number + 1}: not valid UTF-8 (byte {exc.start})") from None


# ---------------------------------------------------------------------------
# Splits


@dataclass(frozen=True)
class Splits:
    train: list[Document]
    validation: list[Document]
    test: list[Document]

    def items(self) -> list[tuple[str, list[Document]]]:
        return [("train", self.train), ("validation", self.validation), ("test", self.test)]


def document_unit_hash(document_id: str) -> float:
    """Map a document id to a stable number in [0, 1)."""
    digest = hashlib.sha256(document_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_documents(
    documents: Sequence[Document], fractions: tuple[float, float, float] = (0.9, 0.05, 0.05)
) -> Splits:
    """Assign each document to train/validation/test by a hash of its id.

    Adding or removing a document never moves the others (unless a split would be empty,
    in which case the document nearest to that split's hash interval is moved into it).
    Each split keeps the input order.
    """
    if len(fractions) != 3 or any(not f > 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
        raise DataError(f"split fractions must be three positive numbers summing to 1, got {tuple(fractions)}")
    if len(documents) < 3:
        raise DataError(f"need at least 3 documents to make train/validation/test splits, got {len(documents)}")
    upper_bounds = (fractions[0], fractions[0] + fractions[1], 1.0)
    intervals = [(0.0, upper_bounds[0]), (upper_bounds[0], upper_bounds[1]), (upper_bounds[1], 1.0)]
    positions = [document_unit_hash(d.id) for d in documents]
    assignment = [next(s for s, upper in enumerate(upper_bounds) if u < upper) for u in positions]

    for split_index, (low, high) in enumerate(intervals):
        counts = [assignment.count(s) for s in range(3)]
        if counts[split_index]:
            continue
        # Steal the document whose hash lies closest to the empty interval from a split
        # that can spare one; ties resolve by corpus order, so the result is deterministic.
        donors = [i for i, s in enumerate(assignment) if counts[s] > 1]
        closest = min(donors, key=lambda i: (max(low - positions[i], positions[i] - high, 0.0), i))
        assignment[closest] = split_index

    parts: list[list[Document]] = [[], [], []]
    for document, split_index in zip(documents, assignment):
        parts[split_index].append(document)
    return Splits(*parts)


# ---------------------------------------------------------------------------
# Tokenizer


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Write through a temp file in the same directory so readers never see a partial file;
    an OSError (a full disk) becomes a WriteError naming `path`."""
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        temp_path = Path(temp_name)
        try:
            write(temp_path)
            os.replace(temp_path, path)
        except BaseException:
            temp_path.unlink(missing_ok=True)
            raise


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the id of the end-of-text token that separates documents."""

    def __init__(self, backend: tokenizers.Tokenizer, eos_token: str = EOS_TOKEN):
        eos_id = backend.token_to_id(eos_token)
        if eos_id is None:
            raise DataError(f"tokenizer has no token {eos_token!r} to use as end-of-text")
        self.backend = backend
        self.eos_token = eos_token
        self.eos_id: int = eos_id
        # Literal "<|endoftext|>" inside a document is text, not a document boundary.
        self.backend.encode_special_tokens = True

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        # The offset-free variant is what we need and is cheaper.
        return [e.ids for e in self.backend.encode_batch_fast(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=False)

    def to_json(self) -> str:
        return self.backend.to_str()

    def save(self, directory: str | Path) -> None:
        """Write `tokenizer.json` and a `tokenizer_config.json` naming the eos token, a layout
        that both `Tokenizer.load` and transformers' `AutoTokenizer` can read."""
        directory = Path(directory)
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": self.eos_token}
        _atomic_write(directory / "tokenizer.json", lambda p: p.write_text(self.to_json(), encoding="utf-8"))
        _atomic_write(directory / "tokenizer_config.json",
                      lambda p: p.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8"))

    @classmethod
    def load(cls, directory: str | Path) -> "Tokenizer":
        directory = Path(directory)
        tokenizer_file = directory / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise DataError(f"tokenizer directory {directory} has no tokenizer.json")
        return cls._from_tokenizer_file(tokenizer_file, _eos_from_config(directory) or EOS_TOKEN)

    @classmethod
    def from_hf_dir(cls, directory: str | Path) -> "Tokenizer":
        """The tokenizer saved with a Hugging Face model directory; eos is its eos token."""
        directory = Path(directory)
        if not directory.is_dir():
            raise DataError(f"tokenizer directory {directory} does not exist")
        tokenizer_file = directory / "tokenizer.json"
        if tokenizer_file.is_file():
            eos_token = _eos_from_config(directory)
            if eos_token is None:
                raise DataError(f"tokenizer in {directory} declares no eos_token in "
                                "tokenizer_config.json or special_tokens_map.json")
            return cls._from_tokenizer_file(tokenizer_file, eos_token)
        return cls._from_transformers(directory)

    @classmethod
    def _from_tokenizer_file(cls, tokenizer_file: Path, eos_token: str) -> "Tokenizer":
        try:
            backend = tokenizers.Tokenizer.from_file(str(tokenizer_file))
        except Exception as exc:  # the Rust side raises a bare Exception on bad JSON
            raise DataError(f"cannot load tokenizer {tokenizer_file}: {exc}") from None
        return cls(backend, eos_token)

    @classmethod
    def _from_transformers(cls, directory: Path) -> "Tokenizer":
        # Fallback for directories with only slow-tokenizer files (e.g. sentencepiece);
        # transformers converts them to a `tokenizers` backend.
        from transformers import AutoTokenizer

        try:
            hf_tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
        except Exception as exc:  # transformers raises many types for "not a tokenizer dir"
            message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise DataError(f"cannot load a tokenizer from {directory}: {message}") from None
        backend = getattr(hf_tokenizer, "backend_tokenizer", None)
        if not isinstance(backend, tokenizers.Tokenizer):
            raise DataError(f"tokenizer in {directory} has no `tokenizers` backend")
        if not hf_tokenizer.eos_token:
            raise DataError(f"tokenizer in {directory} has no eos token")
        return cls(backend, str(hf_tokenizer.eos_token))


def _eos_from_config(directory: Path) -> str | None:
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        config_file = directory / name
        if not config_file.is_file():
            continue
        try:
            config = json.loads(config_file.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise DataError(f"cannot read {config_file}: {exc}") from None
        eos = config.get("eos_token") if isinstance(config, dict) else None
        if isinstance(eos, dict):  # AddedToken serialised as {"content": ..., ...}
            eos = eos.get("content")
        if isinstance(eos, str) and eos:
            return eos
    return None


def _sha256_of_texts(header: str, texts: Iterable[str]) -> str:
    digest = hashlib.sha256(header.encode("utf-8"))
    for text in texts:
        encoded = text.encode("utf-8")
        # Length prefixes make ["ab", "c"] and ["a", "bc"] hash differently.
        digest.update(len(encoded).to_bytes(8, "little"))
        digest.update(encoded)
    return digest.hexdigest()


def _train_bpe(texts: Sequence[str], vocab_size: int) -> tokenizers.Tokenizer:
    backend = tokenizers.Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        # All 256 byte symbols up front, so any input (any language, binary junk) encodes.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer, length=len(texts))
    return backend


def tokenizer_cache_key(texts: Sequence[str], vocab_size: int) -> str:
    header = f"bpe-v{CACHE_FORMAT_VERSION}|vocab={vocab_size}|tokenizers={tokenizers.__version__}|"
    return _sha256_of_texts(header, texts)


def train_tokenizer(texts: Iterable[str], vocab_size: int, cache_dir: str | Path) -> Tokenizer:
    """Byte-level BPE trained on `texts`, cached under cache_dir/tokenizers/<content hash>/."""
    if vocab_size < MIN_VOCAB_SIZE:
        raise DataError(f"vocab_size must be at least {MIN_VOCAB_SIZE} for byte-level BPE, got {vocab_size}")
    texts = list(texts)
    cache_file = Path(cache_dir) / "tokenizers" / tokenizer_cache_key(texts, vocab_size) / "tokenizer.json"
    if cache_file.is_file():
        logger.info("tokenizer cache hit: %s", cache_file)
        return Tokenizer._from_tokenizer_file(cache_file, EOS_TOKEN)
    started = time.perf_counter()
    backend = _train_bpe(texts, vocab_size)
    _atomic_write(cache_file, lambda p: backend.save(str(p)))
    logger.info("trained byte-level BPE (vocab %d) on %d texts in %.1fs -> %s",
                backend.get_vocab_size(), len(texts), time.perf_counter() - started, cache_file)
    return Tokenizer(backend)


# ---------------------------------------------------------------------------
# Token streams, packing, batches


def tokenize_documents(
    tokenizer: Tokenizer, documents: Sequence[Document], cache_dir: str | Path | None = None
) -> np.ndarray:
    """All documents encoded and joined with eos between them, as int32.

    With `cache_dir`, the array is cached as cache_dir/tokens/<hash>.npy, keyed by the
    tokenizer's full JSON and every document's id and text.
    """
    cache_file = None
    if cache_dir is not None:
        header = f"tokens-v{CACHE_FORMAT_VERSION}|eos={tokenizer.eos_id}|{tokenizer.to_json()}|"
        key = _sha256_of_texts(header, (part for d in documents for part in (d.id, d.text)))
        cache_file = Path(cache_dir) / "tokens" / f"{key}.npy"
        if cache_file.is_file():
            logger.info("token cache hit: %s", cache_file)
            return np.load(cache_file, allow_pickle=False)

    started = time.perf_counter()
    eos = np.array([tokenizer.eos_id], dtype=np.int32)
    pieces: list[np.ndarray] = []
    for chunk in _chunks_by_size(documents, ENCODE_CHUNK_CHARS):
        for ids in tokenizer.encode_batch([d.text for d in chunk]):
            if pieces:
                pieces.append(eos)
            pieces.append(np.asarray(ids, dtype=np.int32))
    tokens = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int32)
    logger.info("tokenized %d documents into %d tokens in %.1fs",
                len(documents), tokens.size, time.perf_counter() - started)
    if cache_file is not None:
        _atomic_write(cache_file, lambda p: _save_npy(p, tokens))
    return tokens


def _save_npy(path: Path, array: np.ndarray) -> None:
    # A file handle, because np.save would append ".npy" to the temp file's name.
    with open(path, "wb") as handle:
        np.save(handle, array, allow_pickle=False)


def _chunks_by_size(documents: Sequence[Document], max_chars: int) -> Iterator[list[Document]]:
    chunk: list[Document] = []
    size = 0
    for document in documents:
        if chunk and size + len(document.text) > max_chars:
            yield chunk
            chunk, size = [], 0
        chunk.append(document)
        size += len(document.text)
    if chunk:
        yield chunk


def pack(tokens: np.ndarray, seq_len: int) -> torch.Tensor:
    """Cut a token stream into non-overlapping rows of seq_len + 1 tokens
    (inputs = rows[:, :-1], targets = rows[:, 1:]); the ragged tail is dropped."""
    if seq_len < 1:
        raise DataError(f"seq_len must be at least 1, got {seq_len}")
    window = seq_len + 1
    rows = len(tokens) // window
    if rows < 1:
        raise DataError(f"{len(tokens)} tokens are fewer than one window of seq_len + 1 = {window}")
    packed = np.asarray(tokens[: rows * window], dtype=np.int64).reshape(rows, window)
    return torch.from_numpy(packed)


def _seed_for_epoch(seed: int, epoch: int) -> int:
    # Hashing (rather than seed + epoch) keeps (seed=0, epoch=1) and (seed=1, epoch=0) apart.
    digest = hashlib.sha256(f"{seed}:{epoch}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & (2**63 - 1)


class BatchSampler:
    """Shuffled row indices per epoch, reproducible from (seed, epoch) alone.

    A global batch is `batch_size * world_size` rows of the epoch's permutation; rank r takes
    rows r, r + world_size, ... of it, so the ranks of a data-parallel run together see exactly
    the batches one process with batch size `batch_size * world_size` would see. To resume,
    skip the first k entries of `batches_for_epoch(epoch)`.

    With drop_last=False the final global batch may be short; every rank still gets an entry
    for it (possibly with fewer rows, or none) so all ranks take the same number of steps.
    """

    def __init__(self, num_rows: int, batch_size: int, seed: int, rank: int = 0,
                 world_size: int = 1, drop_last: bool = True):
        if batch_size < 1:
            raise DataError(f"batch_size must be at least 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise DataError(f"rank {rank} is not valid for world_size {world_size}")
        global_batch = batch_size * world_size
        if num_rows < 1 or (drop_last and num_rows < global_batch):
            raise DataError(f"{num_rows} packed rows cannot fill one global batch of {global_batch} "
                            f"(batch_size {batch_size} x world_size {world_size}); "
                            "use more data, a shorter seq_len or a smaller batch")
        self.num_rows = num_rows
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.drop_last = drop_last

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.world_size

    def __len__(self) -> int:
        full, remainder = divmod(self.num_rows, self.global_batch_size)
        return full + (1 if remainder and not self.drop_last else 0)

    def batches_for_epoch(self, epoch: int) -> list[torch.Tensor]:
        generator = torch.Generator().manual_seed(_seed_for_epoch(self.seed, epoch))
        order = torch.randperm(self.num_rows, generator=generator)
        step = self.global_batch_size
        return [order[start : start + step][self.rank :: self.world_size]
                for start in range(0, len(self) * step, step)]


# ---------------------------------------------------------------------------
# The whole pipeline


def unigram_perplexity(train_tokens: np.ndarray, eval_tokens: np.ndarray, vocab_size: int) -> float:
    """Perplexity on `eval_tokens` of a unigram model fit on `train_tokens` with add-one smoothing."""
    if len(eval_tokens) == 0:
        raise DataError("cannot compute perplexity on zero evaluation tokens")
    counts = np.bincount(np.asarray(train_tokens, dtype=np.int64), minlength=vocab_size)[:vocab_size]
    log_probs = np.log(counts + 1.0) - math.log(len(train_tokens) + vocab_size)
    return float(np.exp(-log_probs[np.asarray(eval_tokens, dtype=np.int64)].mean()))


@dataclass
class PreparedData:
    tokenizer: Tokenizer
    train: torch.Tensor
    validation: torch.Tensor
    test: torch.Tensor
    split_sizes: dict[str, dict[str, int]]
    """{"train": {"documents": n, "tokens": n, "rows": n}, "validation": ..., "test": ...}"""
    unigram_perplexity: float
    """The baseline a trained model must beat: see `prepare_data`."""


def prepare_data(
    source: str | Path,
    vocab_size: int,
    seq_len: int,
    cache_dir: str | Path,
    text_field: str = "text",
    max_documents: int | None = None,
    tokenizer_dir: str | Path | None = None,
) -> PreparedData:
    """Load, split, tokenize and pack a corpus.

    The tokenizer is trained on the train split only (or loaded from `tokenizer_dir`, in which
    case `vocab_size` is unused). `unigram_perplexity` is fit on the train token stream and
    evaluated on the packed validation targets, i.e. exactly the tokens a model's validation
    loss is measured on.
    """
    cache_dir = Path(cache_dir)
    documents = load_documents(source, text_field=text_field, max_documents=max_documents)
    if len(documents) < MIN_DOCUMENTS:  # too few to split by document: split by position within them
        limit = max(1, min(TEXT_DOCUMENT_CHARS, sum(len(d.text) for d in documents) // MIN_DOCUMENTS))
        documents = [piece for d in documents for piece in paragraph_documents(d.id, d.text, limit)]
    splits = split_documents(documents)
    if tokenizer_dir is not None:
        tokenizer = Tokenizer.from_hf_dir(tokenizer_dir)
        logger.info("using tokenizer from %s (vocab %d)", tokenizer_dir, tokenizer.vocab_size)
    else:
        tokenizer = train_tokenizer([d.text for d in splits.train], vocab_size, cache_dir)

    streams: dict[str, np.ndarray] = {}
    packed: dict[str, torch.Tensor] = {}
    for name, split in splits.items():
        streams[name] = tokenize_documents(tokenizer, split, cache_dir)
        try:
            packed[name] = pack(streams[name], seq_len)
        except DataError as exc:
            raise DataError(f"{name} split ({len(split)} documents) is too small: {exc}") from None

    split_sizes = {name: {"documents": len(split), "tokens": int(streams[name].size),
                          "rows": int(packed[name].shape[0])}
                   for name, split in splits.items()}
    baseline = unigram_perplexity(streams["train"], packed["validation"][:, 1:].numpy().ravel(),
                                  tokenizer.vocab_size)
    logger.info("splits %s; unigram validation perplexity %.2f", split_sizes, baseline)
    return PreparedData(tokenizer, packed["train"], packed["validation"], packed["test"],
                        split_sizes, baseline)
