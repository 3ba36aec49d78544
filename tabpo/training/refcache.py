"""Reference log-probs computed once for a whole data set and cached on disk.

The cache key hashes everything the numbers depend on: the reference weights (the bytes
of its safetensors files), the exact token ids of every pair (so the tokenizer, its chat
template, the data and the length settings are all covered), the backend and the dtype. A
file whose stored key differs is never used. Files are written atomically.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import load_file, save_file

from tabpo.data.batching import PairBatch, batches
from tabpo.data.encoding import EncodedPair

VERSION = "1"


def default_cache_dir() -> Path:
    root = os.environ.get("TABPO_CACHE_DIR") or Path.home() / ".cache" / "tabpo"
    return Path(root) / "ref"


def weights_digest(model: str) -> str:
    """sha256 over the model's safetensors files (name and bytes); a hub id hashes as its name."""
    path = Path(model)
    h = hashlib.sha256()
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else []
    if not files:
        h.update(f"name:{model}".encode())
    for file in files:
        h.update(file.name.encode())
        with open(file, "rb") as fh:
            while chunk := fh.read(1 << 23):
                h.update(chunk)
    return h.hexdigest()


def cache_key(weights: str, pairs: Sequence[EncodedPair], *, backend: str, dtype: str) -> str:
    h = hashlib.sha256(f"tabpo-ref/{VERSION}/{backend}/{dtype}/{weights}".encode())
    for p in pairs:
        for ids in (p.prompt_ids, p.chosen_ids, p.rejected_ids):
            h.update(np.asarray(ids, dtype=np.int64).tobytes())
            h.update(b"|")
    return h.hexdigest()[:32]


class RefTable:
    """Reference per-token log-probs of every pair's completions, by pair index."""

    def __init__(self, chosen: dict[int, np.ndarray], rejected: dict[int, np.ndarray]):
        self.chosen, self.rejected = chosen, rejected

    def for_batch(self, batch: PairBatch) -> tuple[np.ndarray, np.ndarray]:
        """(B, T) arrays laid out like the batch's masks (each row's values at its mask)."""
        assert batch.rejected_mask is not None, "a reference is only needed for pairs"
        return (
            _layout(batch.chosen_mask, [self.chosen[int(i)] for i in batch.indices]),
            _layout(batch.rejected_mask, [self.rejected[int(i)] for i in batch.indices]),
        )


def _layout(mask: np.ndarray, rows: list[np.ndarray]) -> np.ndarray:
    out = np.zeros(mask.shape, dtype=np.float32)
    for b, values in enumerate(rows):
        out[b, mask[b] > 0] = values
    return out


def compute(
    logps: Callable[[PairBatch], tuple[np.ndarray, np.ndarray]],
    pairs: Sequence[EncodedPair],
    *,
    batch_size: int,
    pad_id: int,
    progress: Callable[[int], None] | None = None,
) -> RefTable:
    """Run ``logps`` (a backend's reference log-probs) over every pair once."""
    chosen: dict[int, np.ndarray] = {}
    rejected: dict[int, np.ndarray] = {}
    for batch in batches(pairs, batch_size, pad_id=pad_id):
        ref_c, ref_r = logps(batch)
        assert batch.rejected_mask is not None, "a reference is only needed for pairs"
        for b, index in enumerate(batch.indices):
            chosen[int(index)] = ref_c[b, batch.chosen_mask[b] > 0].astype(np.float32)
            rejected[int(index)] = ref_r[b, batch.rejected_mask[b] > 0].astype(np.float32)
        if progress is not None:
            progress(len(batch.indices))
    return RefTable(chosen, rejected)


def save(table: RefTable, path: Path, key: str) -> None:
    """One safetensors file: flat values plus per-pair lengths, the key in the metadata."""
    index = np.array(sorted(table.chosen), dtype=np.int64)
    tensors = {"index": index}
    for side, values in (("chosen", table.chosen), ("rejected", table.rejected)):
        rows = [values[int(i)] for i in index]
        tensors[f"{side}_lengths"] = np.array([len(r) for r in rows], dtype=np.int64)
        tensors[f"{side}_values"] = np.concatenate(rows).astype(np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file(tensors, str(tmp), metadata={"key": key, "format": "tabpo-ref"})
    os.replace(tmp, path)


def load(path: Path, key: str) -> RefTable | None:
    """The cached table, or None when absent, unreadable or made under another key."""
    try:
        with safe_open(str(path), "np") as fh:
            if (fh.metadata() or {}).get("key") != key:
                return None
        tensors = load_file(str(path))
    except (OSError, ValueError, RuntimeError, SafetensorError):  # absent, truncated, not ours
        return None
    index = tensors["index"]
    out = []
    for side in ("chosen", "rejected"):
        splits = np.cumsum(tensors[f"{side}_lengths"])[:-1]
        rows = np.split(tensors[f"{side}_values"], splits)
        out.append({int(i): r for i, r in zip(index, rows, strict=True)})
    return RefTable(*out)
