"""Embedding quantization: int8 calibrated per dimension, binary sign bits with Hamming search,
and rescoring of a binary shortlist with the float query.

Sizes: float32 keeps 4 bytes per dimension, int8 1 byte, binary 1 bit (np.packbits), so a
binary index is exactly 1/32 of the float32 one. Both codecs also keep a few float32
vectors of length d (ranges, thresholds), a constant that does not grow with the corpus.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

RescoreWith = Literal["binary", "int8", "float32"]


def normalize_rows(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(norms, 1e-12)).astype(np.float32)


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k highest scores per row, best first."""
    k = min(k, scores.shape[1])
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(scores, part, axis=1), axis=1, kind="stable")
    return np.take_along_axis(part, order, axis=1)


# ----------------------------------------------------------------------------- int8


@dataclass
class Int8Codec:
    """code = round((x - low) / scale) - 128, with low/scale per dimension from calibration data.

    Calibrating per dimension matters: embedding dimensions differ in range by an order of
    magnitude, and one global range would spend most of the 256 levels on the widest ones.
    """

    low: np.ndarray
    scale: np.ndarray

    @classmethod
    def calibrate(cls, x: np.ndarray) -> "Int8Codec":
        low, high = x.min(axis=0), x.max(axis=0)
        scale = np.maximum(high - low, 1e-12) / 255.0
        return cls(low.astype(np.float32), scale.astype(np.float32))

    def encode(self, x: np.ndarray) -> np.ndarray:
        codes = np.rint((x - self.low) / self.scale) - 128.0
        return np.clip(codes, -128, 127).astype(np.int8)

    def decode(self, codes: np.ndarray) -> np.ndarray:
        return (codes.astype(np.float32) + 128.0) * self.scale + self.low

    def scores(self, queries: np.ndarray, codes: np.ndarray) -> np.ndarray:
        """Float queries dotted with the dequantized documents, without materialising them:
        q . ((c + 128) * scale + low) = (q * scale) . (c + 128) + q . low."""
        weighted = (queries * self.scale).astype(np.float32)
        return weighted @ (codes.astype(np.float32) + 128.0).T + (queries @ self.low)[:, None]

    def extra_bytes(self) -> int:
        return self.low.nbytes + self.scale.nbytes


# ----------------------------------------------------------------------------- binary


def _popcount_table() -> np.ndarray:
    return np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


_POPCOUNT = _popcount_table()


def popcount(x: np.ndarray) -> np.ndarray:
    if hasattr(np, "bitwise_count"):  # numpy >= 2.0: a hardware popcount
        return np.bitwise_count(x)
    return _POPCOUNT[x.view(np.uint8)].reshape(*x.shape, -1).sum(-1)


@dataclass
class BinaryCodec:
    """One bit per dimension: x > threshold, packed 8 per byte.

    The threshold is each dimension's median over the calibration documents, so every bit
    splits the corpus in half (it carries the most information); `spread` (mean distance
    from the threshold) lets a float query be scored against the bits alone as the
    reconstruction threshold +/- spread.
    """

    threshold: np.ndarray
    spread: np.ndarray
    dim: int

    @classmethod
    def calibrate(cls, x: np.ndarray, threshold: Literal["median", "zero"] = "median") -> "BinaryCodec":
        t = np.median(x, axis=0) if threshold == "median" else np.zeros(x.shape[1])
        spread = np.abs(x - t).mean(axis=0)
        return cls(t.astype(np.float32), spread.astype(np.float32), x.shape[1])

    def encode(self, x: np.ndarray) -> np.ndarray:
        return np.packbits(x > self.threshold, axis=1)

    def signs(self, codes: np.ndarray) -> np.ndarray:
        """+1/-1 per dimension, float32 [n, dim]."""
        bits = np.unpackbits(codes, axis=1, count=self.dim)
        return bits.astype(np.float32) * 2.0 - 1.0

    def hamming(self, query_codes: np.ndarray, codes: np.ndarray, chunk: int = 256) -> np.ndarray:
        """[nq, n] Hamming distances, XOR and popcount on 64-bit words where the width allows."""
        q, c = query_codes, codes
        if q.shape[1] % 8 == 0:
            q, c = np.ascontiguousarray(q).view(np.uint64), np.ascontiguousarray(c).view(np.uint64)
        out = np.empty((len(q), len(c)), dtype=np.int32)
        for start in range(0, len(q), chunk):
            block = q[start:start + chunk]
            out[start:start + chunk] = popcount(block[:, None, :] ^ c[None, :, :]).sum(-1, dtype=np.int32)
        return out

    def asymmetric_scores(self, queries: np.ndarray, codes: np.ndarray) -> np.ndarray:
        """Float queries against the reconstruction threshold + spread * sign(bit): no extra storage."""
        return (queries * self.spread) @ self.signs(codes).T + (queries @ self.threshold)[:, None]

    def extra_bytes(self) -> int:
        return self.threshold.nbytes + self.spread.nbytes


# ----------------------------------------------------------------------------- the index


@dataclass
class QuantizedIndex:
    """Float32, int8 and binary copies of one corpus's embeddings, searchable each way.

    Embeddings are prepared as the embedder asks (`center`: subtract the corpus mean) and
    L2-normalised, so float32 dot products are cosine similarities. `dims` keeps only a
    Matryoshka prefix of each embedding before all of that.
    """

    float32: np.ndarray
    int8: np.ndarray
    binary: np.ndarray
    int8_codec: Int8Codec
    binary_codec: BinaryCodec
    mean: np.ndarray | None
    dims: int

    @classmethod
    def build(cls, embeddings: np.ndarray, center: bool, dims: int | None = None) -> "QuantizedIndex":
        dims = dims or embeddings.shape[1]
        x = embeddings[:, :dims].astype(np.float32)
        mean = x.mean(axis=0).astype(np.float32) if center else None
        x = normalize_rows(x - mean if mean is not None else x)
        int8_codec, binary_codec = Int8Codec.calibrate(x), BinaryCodec.calibrate(x)
        return cls(x, int8_codec.encode(x), binary_codec.encode(x), int8_codec, binary_codec, mean, dims)

    def prepare_queries(self, embeddings: np.ndarray) -> np.ndarray:
        q = embeddings[:, :self.dims].astype(np.float32)
        return normalize_rows(q - self.mean if self.mean is not None else q)

    def sizes(self) -> dict[str, int]:
        """Bytes of each corpus copy, codes only (the per-dimension calibration is `calibration_bytes`)."""
        return {"float32": self.float32.nbytes, "int8": self.int8.nbytes, "binary": self.binary.nbytes}

    def calibration_bytes(self) -> dict[str, int]:
        return {"int8": self.int8_codec.extra_bytes(), "binary": self.binary_codec.extra_bytes()}

    def search(self, queries: np.ndarray, k: int, method: str = "float32", rescore_multiplier: int = 4,
               rescore_with: RescoreWith = "int8") -> np.ndarray:
        """[nq, k] document indices, best first, for prepared queries.

        method: float32 | int8 (float query . dequantized int8) | binary (Hamming) |
        binary-rescore (Hamming shortlist of k * rescore_multiplier, re-ranked by the float query
        against `rescore_with`: the bits themselves, the int8 codes, or the float32 vectors).
        """
        if method == "float32":
            return top_k(queries @ self.float32.T, k)
        if method == "int8":
            return top_k(self.int8_codec.scores(queries, self.int8), k)
        distances = self.binary_codec.hamming(self.binary_codec.encode(queries), self.binary)
        # -distance plus a tiny float tie-break keeps equal distances in document order.
        if method == "binary":
            return top_k(-distances.astype(np.float32), k)
        if method != "binary-rescore":
            raise ValueError(f"unknown search method {method!r}")
        shortlist = top_k(-distances.astype(np.float32), max(k, k * rescore_multiplier))
        out = np.empty((len(queries), min(k, shortlist.shape[1])), dtype=np.int64)
        for i, (query, candidates) in enumerate(zip(queries, shortlist)):
            q = query[None, :]
            if rescore_with == "float32":
                scores = q @ self.float32[candidates].T
            elif rescore_with == "int8":
                scores = self.int8_codec.scores(q, self.int8[candidates])
            else:
                scores = self.binary_codec.asymmetric_scores(q, self.binary[candidates])
            out[i] = candidates[top_k(scores, k)[0]]
        return out


# ----------------------------------------------------------------------------- on disk

INDEX_FORMAT = 1
_ARRAYS = ("float32", "int8", "binary")


def save_index(index: QuantizedIndex, directory, metadata: dict) -> None:
    """Arrays as .npy (read back with allow_pickle=False), everything else as JSON."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    arrays = {name: getattr(index, name) for name in _ARRAYS}
    arrays.update(int8_low=index.int8_codec.low, int8_scale=index.int8_codec.scale,
                  binary_threshold=index.binary_codec.threshold, binary_spread=index.binary_codec.spread)
    if index.mean is not None:
        arrays["mean"] = index.mean
    for name, array in arrays.items():
        with open(directory / f"{name}.npy", "wb") as handle:
            np.save(handle, array, allow_pickle=False)
    info = dict(metadata, format=INDEX_FORMAT, dims=index.dims, documents=len(index.float32),
                centered=index.mean is not None, bytes=index.sizes())
    (directory / "index.json").write_text(json.dumps(info, indent=2) + "\n")


def load_index(directory) -> tuple[QuantizedIndex, dict]:
    directory = Path(directory)
    info_file = directory / "index.json"
    if not info_file.is_file():
        raise ValueError(f"{directory} is not an index written by `ryzen embed` (no index.json)")
    info = json.loads(info_file.read_text())
    if info.get("format") != INDEX_FORMAT:
        raise ValueError(f"{directory}: index format {info.get('format')} is not {INDEX_FORMAT}")

    def array(name: str) -> np.ndarray:
        return np.load(directory / f"{name}.npy", allow_pickle=False)

    index = QuantizedIndex(
        float32=array("float32"), int8=array("int8"), binary=array("binary"),
        int8_codec=Int8Codec(array("int8_low"), array("int8_scale")),
        binary_codec=BinaryCodec(array("binary_threshold"), array("binary_spread"), int(info["dims"])),
        mean=array("mean") if info["centered"] else None, dims=int(info["dims"]))
    return index, info
