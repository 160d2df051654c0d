"""A corpus's contexts: what is per context in memory, the token ids on disk, read a slice at a time.

At 10^8 tokens the `[n_ctx, L]` int64 ids and mask take 1.6 GB held whole (2.4 GB packed, with each token's
document). Here memory holds only what is per context (its length and split: 9 bytes a context) and where
each run of one document's tokens starts (16 bytes a run: one per window, a few per packed context).
`ContextWriter` appends padded rows to a raw file a block at a time and lays them out as
`contexts.safetensors` at the end, and readers take slices with plain reads (`Contexts.ids`): a memory map
would count every page it touched in the RSS.

The attention mask is never held: contexts are right-padded, so row c's mask is its first `lengths[c]`
positions (`Contexts.mask`). The file keeps the layout `safetensors.torch.save_file` gives the same tensors
(attention_mask, input_ids, heldout), byte for byte, so readers of the format are unchanged.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from array import array
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

# rows buffered, copied or hashed at a time (16 MiB): memory is set by this, not by the corpus
BLOCK_BYTES = 1 << 24


def block_contexts(length: int) -> int:
    return max(1, BLOCK_BYTES // (8 * length))


class Contexts:
    """`n_contexts` right-padded contexts of `length` tokens; ids in memory (`ids=`) or in a file (`path=`).

    `starts[i]` is the cache row (real tokens counted in context order) where run i of one document's tokens
    begins and `docs[i]` that document's row in the documents frame: one run per window, one per piece of a
    document in a packed context. Contexts opened from a file alone (`open_contexts`) have no runs.
    """

    def __init__(
        self,
        lengths: torch.Tensor,
        heldout: torch.Tensor,
        length: int,
        *,
        ids: torch.Tensor | None = None,
        path: Path | None = None,
        offset: int = 0,
        runs: tuple[torch.Tensor, torch.Tensor] | None = None,
    ):
        self.lengths, self.heldout, self.length = lengths.long(), heldout.bool(), length
        self._ids, self.path, self._offset, self._runs = ids, path, offset, runs

    @classmethod
    def from_tensors(cls, input_ids, attention_mask, doc_index, heldout, token_doc=None) -> Contexts:
        """Contexts held in memory (tests, benchmarks); the mask must be right-padded, as builders pad."""
        lengths = attention_mask.sum(1)
        if not torch.equal(attention_mask.long(), _mask(lengths, input_ids.shape[1])):
            raise ValueError(
                "attention_mask is not right-padded; contexts keep real tokens first in each row"
            )
        starts = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)[:-1]])
        runs = (starts, doc_index.long())
        if token_doc is not None:
            flat = token_doc[attention_mask.bool()]
            first = torch.ones_like(flat, dtype=torch.bool)
            first[1:] = flat[1:] != flat[:-1]
            first[starts[lengths > 0]] = True  # a run never crosses contexts
            runs = (first.nonzero().squeeze(1), flat[first])
        return cls(lengths, heldout, input_ids.shape[1], ids=input_ids.long(), runs=runs)

    @property
    def n_contexts(self) -> int:
        return len(self.lengths)

    @property
    def n_tokens(self) -> int:
        return int(self.lengths.sum())

    @property
    def doc_index(self) -> torch.Tensor:
        """[n_ctx] document row of each context's first token."""
        starts, docs = self._need_runs()
        ends = self.lengths.cumsum(0)
        return docs[torch.searchsorted(starts, ends - self.lengths, right=True) - 1]

    def ids(self, a: int, b: int) -> torch.Tensor:
        """[b - a, L] int64 token ids of contexts a..b (padded with the pad id)."""
        b = min(b, self.n_contexts)
        if self._ids is not None:
            return self._ids[a:b]
        n = max(b - a, 0) * self.length
        with open(self.path, "rb") as f:
            f.seek(self._offset + a * self.length * 8)
            out = np.fromfile(f, dtype="<i8", count=n)
        if len(out) != n:
            raise RuntimeError(f"{self.path} is shorter than its header says; delete it and cache again")
        return torch.from_numpy(out).view(-1, self.length)

    def mask(self, a: int, b: int) -> torch.Tensor:
        """[b - a, L] int64 attention mask of contexts a..b."""
        return _mask(self.lengths[a:b], self.length)

    def doc_rows(self, a: int, b: int) -> torch.Tensor:
        """Document row of every real token of contexts a..b, in cache-row order."""
        starts, docs = self._need_runs()
        ends = self.lengths.cumsum(0)
        r0 = int(ends[a - 1]) if a else 0
        rows = torch.arange(r0, int(ends[min(b, self.n_contexts) - 1]) if b > a else r0)
        return docs[torch.searchsorted(starts, rows, right=True) - 1]

    def blocks(self) -> Iterator[tuple[int, int]]:
        step = block_contexts(self.length)
        for a in range(0, self.n_contexts, step):
            yield a, min(a + step, self.n_contexts)

    def sha256(self) -> str:
        """sha256 of the ids' bytes, as of `input_ids.numpy()` whole, a block at a time."""
        h = hashlib.sha256()
        for a, b in self.blocks():
            h.update(self.ids(a, b).numpy())
        return h.hexdigest()

    # whole tensors: for small corpora and tests; the stages read slices
    @property
    def input_ids(self) -> torch.Tensor:
        return self.ids(0, self.n_contexts)

    @property
    def attention_mask(self) -> torch.Tensor:
        return self.mask(0, self.n_contexts)

    @property
    def token_doc(self) -> torch.Tensor:
        """[n_ctx, L] document row per position, -1 on padding."""
        out = torch.full((self.n_contexts, self.length), -1, dtype=torch.int64)
        out[self.attention_mask.bool()] = self.doc_rows(0, self.n_contexts)
        return out

    def save(self, path: Path) -> None:
        """Write these contexts as `path` (contexts.safetensors), atomically; nothing if they are in it."""
        if self.path is not None and Path(self.path).resolve() == Path(path).resolve():
            return
        _compose(path, self, (self.ids(a, b).numpy() for a, b in self.blocks()))

    def _need_runs(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._runs is None:
            raise RuntimeError("these contexts were opened from their file alone and carry no documents")
        return self._runs


def _mask(lengths: torch.Tensor, length: int) -> torch.Tensor:
    return (torch.arange(length) < lengths.long()[:, None]).long()


def _header(n: int, length: int) -> bytes:
    """The safetensors header `save_file` writes for these three tensors (its order: I64 first, by name)."""
    big = n * length * 8
    meta = {
        "attention_mask": {"dtype": "I64", "shape": [n, length], "data_offsets": [0, big]},
        "input_ids": {"dtype": "I64", "shape": [n, length], "data_offsets": [big, 2 * big]},
        "heldout": {"dtype": "U8", "shape": [n], "data_offsets": [2 * big, 2 * big + n]},
    }
    text = json.dumps(meta, separators=(",", ":")).encode()
    text += b" " * (-(8 + len(text)) % 8)
    return len(text).to_bytes(8, "little") + text


def _compose(path: Path, contexts: Contexts, id_blocks) -> int:
    """Write contexts.safetensors from the per-context arrays and the ids' bytes in row order; return the
    offset of the ids in the file. Written under a temporary name, fsynced, then renamed."""
    n, L = contexts.n_contexts, contexts.length
    head = _header(n, L)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    try:
        with tmp.open("wb") as f:
            f.write(head)
            for a, b in contexts.blocks():
                f.write(contexts.mask(a, b).numpy())
            for block in id_blocks:
                f.write(block)
            f.write(contexts.heldout.to(torch.uint8).numpy())
            f.flush()
            os.fsync(f.fileno())
        if tmp.stat().st_size != len(head) + 2 * n * L * 8 + n:
            raise RuntimeError(f"{path}: the ids written do not fill {n} contexts of {L}")
        tmp.chmod(0o644)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return len(head) + n * L * 8


def open_contexts(path: Path) -> Contexts:
    """Contexts read back from a contexts.safetensors (lengths from its mask, read a block at a time)."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        meta = json.loads(f.read(size))
        n, L = meta["input_ids"]["shape"]
        end = 8 + size + max(v["data_offsets"][1] for k, v in meta.items() if k != "__metadata__")
        if os.fstat(f.fileno()).st_size != end:
            raise ValueError(f"{path} is not the size its header says (cut short?); delete it, cache again")
        f.seek(8 + size + meta["heldout"]["data_offsets"][0])
        heldout = torch.from_numpy(np.frombuffer(f.read(n), dtype=np.uint8).copy())
        lengths = torch.empty(n, dtype=torch.int64)
        step = block_contexts(L)
        for a in range(0, n, step):
            b = min(a + step, n)
            f.seek(8 + size + meta["attention_mask"]["data_offsets"][0] + a * L * 8)
            rows = torch.from_numpy(np.fromfile(f, dtype="<i8", count=(b - a) * L).reshape(b - a, L))
            lengths[a:b] = rows.sum(1)
            if not torch.equal(rows, _mask(lengths[a:b], L)):
                raise ValueError(f"{path}: an attention mask is not right-padded; cache the corpus again")
    offset = 8 + size + meta["input_ids"]["data_offsets"][0]
    return Contexts(lengths, heldout, L, path=Path(path), offset=offset)


def remove_stale(path: Path) -> None:
    """Delete what a killed build of `path` left beside it (`.<name>.<pid>.*`, its raw ids or its unrenamed
    file), where that process is gone; a live one's files are its own."""
    for f in path.parent.glob(f".{path.name}.*"):
        pid = f.name[len(path.name) + 2 :].split(".")[0]
        if pid.isdigit() and not _alive(int(pid)):
            f.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def _tensor(buffer, dtype: torch.dtype) -> torch.Tensor:
    return torch.frombuffer(buffer, dtype=dtype).clone() if len(buffer) else torch.zeros(0, dtype=dtype)


class ContextWriter:
    """Contexts appended one at a time, padded into a block that goes to a raw file when full.

    `finish()` lays the rows out as `path` (contexts.safetensors, read back a slice at a time) or, without a
    path, loads them into memory; either way the raw file is removed. Building holds one block.
    """

    def __init__(self, length: int, pad: int, path: Path | None = None):
        self.length, self.pad, self.path = length, pad, path
        self._block = np.full((block_contexts(length), length), pad, dtype=np.int64)
        self._used = 0
        folder, prefix = None, ".contexts."
        if path is not None:
            folder, prefix = path.parent, f".{path.name}.{os.getpid()}."
            folder.mkdir(parents=True, exist_ok=True)
            remove_stale(path)
        fd, raw = tempfile.mkstemp(prefix=prefix, suffix=".ids", dir=folder)
        self._raw, self._file = Path(raw), os.fdopen(fd, "wb")
        self._lengths, self._heldout = array("q"), bytearray()
        self._starts, self._docs = array("q"), array("q")
        self._rows = 0

    def __len__(self) -> int:
        return len(self._lengths)

    def __enter__(self) -> ContextWriter:
        return self

    def __exit__(self, *exc) -> None:  # the raw file goes whether the contexts were finished or not
        self._file.close()
        self._raw.unlink(missing_ok=True)

    def add(self, ids: np.ndarray, heldout: bool, runs: list[tuple[int, int]]) -> None:
        """One context: its real token ids, its split, and (position, document row) where each run starts."""
        if self._used == len(self._block):
            self._flush()
        row = self._block[self._used]
        row[: len(ids)] = ids
        row[len(ids) :] = self.pad
        self._used += 1
        for position, doc in runs:
            self._starts.append(self._rows + position)
            self._docs.append(doc)
        self._rows += len(ids)
        self._lengths.append(len(ids))
        self._heldout.append(heldout)

    def _flush(self) -> None:
        self._file.write(self._block[: self._used])  # the rows' own buffer: no 16 MiB bytes copy
        self._used = 0

    def finish(self) -> Contexts:
        try:
            self._flush()
            self._file.close()
            lengths = _tensor(self._lengths, torch.int64)
            heldout = _tensor(self._heldout, torch.uint8).bool()
            runs = (_tensor(self._starts, torch.int64), _tensor(self._docs, torch.int64))
            if self.path is None:
                ids = torch.from_numpy(np.fromfile(self._raw, dtype=np.int64)).view(-1, self.length)
                return Contexts(lengths, heldout, self.length, ids=ids, runs=runs)
            contexts = Contexts(lengths, heldout, self.length, runs=runs)

            def raw_blocks():
                with self._raw.open("rb") as f:
                    while block := f.read(BLOCK_BYTES):
                        yield block

            offset = _compose(self.path, contexts, raw_blocks())
            return Contexts(lengths, heldout, self.length, path=self.path, offset=offset, runs=runs)
        finally:
            self._file.close()
            self._raw.unlink(missing_ok=True)
