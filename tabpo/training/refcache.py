"""Reference log-probs computed once per pair and cached on disk, keyed by content.

A cache directory holds one folder per reference (``model_key``: the reference weights, the
backend and the dtype) and in it shard files of entries. Each entry is keyed by the pair
it was computed from (``pair_key``: the exact token ids of prompt, chosen and rejected, so
the tokenizer, its chat template, the data and the length settings are all covered), never
by its position in a file: a data set that is reordered, shortened or grown finds the
entries it already has, and only the pairs without one are computed (and written as a new
shard). The weights of a local directory are keyed by their bytes; a hub id by the revision
its local snapshot resolves to. A shard that is unreadable or made for another reference
is ignored, never trusted. Files are written atomically.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import load_file, save_file

from tabpo.common.errors import TabpoError
from tabpo.data.batching import PairBatch, batches
from tabpo.data.encoding import EncodedPair

VERSION = "2"
FORMAT = "tabpo-ref"
Entry = tuple[np.ndarray, np.ndarray]  # the completion's reference log-probs, chosen, rejected


def default_cache_dir() -> Path:
    root = os.environ.get("TABPO_CACHE_DIR") or Path.home() / ".cache" / "tabpo"
    return Path(root) / "ref"


def weights_digest(model: str) -> str:
    """sha256 over a local model's safetensors files (name and bytes); for a hub id, over its
    name and the revision its local snapshot resolves to (the backend downloaded it)."""
    path = Path(model)
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else []
    h = hashlib.sha256()
    if not files:
        h.update(f"hub:{model}@{hub_revision(model)}".encode())
    for file in files:
        h.update(file.name.encode())
        with open(file, "rb") as fh:
            while chunk := fh.read(1 << 23):
                h.update(chunk)
    return h.hexdigest()


def hub_revision(name: str) -> str:
    """The commit hash of the local snapshot of hub model ``name`` (its ``main`` revision, as
    a loader that downloaded it resolved it); an error when there is none."""
    try:
        from huggingface_hub import snapshot_download

        snapshot = snapshot_download(name, local_files_only=True)
    except Exception as exc:  # not installed, not downloaded, or not a valid id
        raise TabpoError(
            f"{name}: no local snapshot to key the reference cache by ({type(exc).__name__})"
        ) from None
    return Path(snapshot).name


def model_key(weights: str, *, backend: str, dtype: str) -> str:
    """The folder of one reference: its weights' digest, the backend and the dtype."""
    return hashlib.sha256(f"{FORMAT}/{VERSION}/{backend}/{dtype}/{weights}".encode()).hexdigest()[
        :32
    ]


def pair_key(pair: EncodedPair) -> str:
    """What a pair's reference log-probs are computed from: its token ids, side by side."""
    h = hashlib.sha256()
    for ids in (pair.prompt_ids, pair.chosen_ids, pair.rejected_ids or []):
        h.update(np.asarray(ids, dtype=np.int64).tobytes())
        h.update(b"|")
    return h.hexdigest()


class RefTable:
    """Reference per-token log-probs of the completions of one data set's pairs, by pair
    index (stable within a run; the disk cache is keyed by content)."""

    def __init__(self, entries: dict[int, Entry]):
        self.entries = entries

    def for_batch(self, batch: PairBatch) -> tuple[np.ndarray, np.ndarray]:
        """(B, T) arrays laid out like the batch's masks (each row's values at its mask)."""
        assert batch.rejected_mask is not None, "a reference is only needed for pairs"
        rows = [self.entries[int(i)] for i in batch.indices]
        return (
            _layout(batch.chosen_mask, [c for c, _ in rows]),
            _layout(batch.rejected_mask, [r for _, r in rows]),
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
    entries: dict[int, Entry] = {}
    for batch in batches(pairs, batch_size, pad_id=pad_id):
        ref_c, ref_r = logps(batch)
        assert batch.rejected_mask is not None, "a reference is only needed for pairs"
        for b, index in enumerate(batch.indices):
            entries[int(index)] = (
                ref_c[b, batch.chosen_mask[b] > 0].astype(np.float32),
                ref_r[b, batch.rejected_mask[b] > 0].astype(np.float32),
            )
        if progress is not None:
            progress(len(batch.indices))
    return RefTable(entries)


class Store:
    """The cached entries of one reference (``directory`` = cache dir / ``model_key``)."""

    def __init__(self, directory: Path, key: str) -> None:
        self.directory, self.key = Path(directory), key

    def lookup(self, pairs: Iterable[EncodedPair]) -> dict[int, Entry]:
        """The entries the cache has for ``pairs``, by pair index; a cached entry whose
        lengths do not fit the pair is not used."""
        cached = self._read()
        found = {}
        for p in pairs:
            entry = cached.get(pair_key(p))
            if entry is not None and (len(entry[0]), len(entry[1])) == _lengths(p):
                found[p.index] = entry
        return found

    def add(self, pairs: Sequence[EncodedPair], table: RefTable) -> Path:
        """Write the entries of ``pairs`` from ``table`` as one new shard."""
        keys = [pair_key(p) for p in pairs]
        rows = [table.entries[p.index] for p in pairs]
        tensors = {"keys": np.array([np.frombuffer(bytes.fromhex(k), np.uint8) for k in keys])}
        for i, side in enumerate(("chosen", "rejected")):
            tensors[f"{side}_lengths"] = np.array([len(r[i]) for r in rows], dtype=np.int64)
            tensors[f"{side}_values"] = np.concatenate([r[i] for r in rows]).astype(np.float32)
        name = hashlib.sha256("".join(sorted(keys)).encode()).hexdigest()[:32]
        path = self.directory / f"{name}.safetensors"
        self.directory.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        save_file(tensors, str(tmp), metadata={"format": FORMAT, "version": VERSION,
                                                "model": self.key})  # fmt: skip
        os.replace(tmp, path)
        return path

    def _read(self) -> dict[str, Entry]:
        out: dict[str, Entry] = {}
        for file in sorted(self.directory.glob("*.safetensors")):
            out.update(_read_shard(file, self.key))
        return out


def _lengths(p: EncodedPair) -> tuple[int, int]:
    return len(p.chosen_ids), len(p.rejected_ids or [])


def _read_shard(path: Path, key: str) -> dict[str, Entry]:
    """A shard's entries, or none when it is unreadable or made for another reference."""
    try:
        with safe_open(str(path), "np") as fh:
            metadata = fh.metadata() or {}
        if (metadata.get("model"), metadata.get("version")) != (key, VERSION):
            return {}
        tensors = load_file(str(path))
        keys = [bytes(row).hex() for row in tensors["keys"]]
        sides = []
        for side in ("chosen", "rejected"):
            lengths = tensors[f"{side}_lengths"]
            values = tensors[f"{side}_values"]
            if int(lengths.sum()) != len(values) or len(lengths) != len(keys):
                return {}
            sides.append(np.split(values, np.cumsum(lengths)[:-1]))
    except (OSError, ValueError, RuntimeError, KeyError, SafetensorError):  # truncated, not ours
        return {}
    return {k: (c, r) for k, c, r in zip(keys, sides[0], sides[1], strict=True)}
