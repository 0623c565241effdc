"""Pack a token stream into training blocks: windows of S+1 tokens with stride S.

Block i is stream[i*S : i*S + S + 1]: input_ids = block[:-1], labels = block[1:]. Consecutive
blocks share one token (the last label of block i is the first input of block i+1), so every
token after the first is a label exactly once. This is the convention of the memmap data source
over the offline shards; the streaming source uses it through this packer.

Letters: S sequence length (tokens of input per block).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable, Iterable, Iterator, Sequence
from typing import Generic, TypeVar

import numpy as np

Key = TypeVar("Key", bound=Hashable)


def document_tokens(pieces: Iterable[Sequence[int]], eos_id: int) -> list[np.ndarray]:
    """A document as the offline shards hold it: its token pieces, then one EOS id."""
    return [np.asarray(p, dtype=np.int64) for p in pieces] + [np.array([eos_id], np.int64)]


class BlockPacker(Generic[Key]):
    """Cuts a stream of documents into blocks and says where the next block starts.

    `push(tokens, key)` appends a document's tokens (in one or more calls with the same key);
    every block it completes comes back with the position of the *next* block's first token as
    (key of that token's document, offset of the token in that document). A reader that saves
    this position can restart the same stream there: skip to that document, drop `offset`
    tokens, and push the rest into a fresh packer.
    """

    def __init__(self, seq_len: int):
        if seq_len < 1:
            raise ValueError(f"seq_len must be positive, got {seq_len}")
        self.seq_len = seq_len
        self._buf = np.empty(2 * (seq_len + 1), np.int64)  # tokens buffered: _buf[_start:_end]
        self._start = 0
        self._end = 0
        # Documents with tokens at or after _start: (key, buffer index of its token at offset 0;
        # negative once the document's head has been compacted away).
        self._docs: deque[tuple[Key, int]] = deque()

    @property
    def buffered(self) -> int:
        """Tokens held from the next block's start on (at most S between pushes)."""
        return self._end - self._start

    def push(self, tokens: np.ndarray, key: Key) -> Iterator[tuple[np.ndarray, tuple[Key, int]]]:
        """Append `tokens` of document `key`; yield (block [S+1] int64, next block's position)."""
        if not self._docs or self._docs[-1][0] != key:
            self._docs.append((key, self._end))
        self._append(tokens)
        window = self.seq_len + 1
        while self._end - self._start >= window:
            block = self._buf[self._start : self._start + window].copy()
            self._start += self.seq_len
            # The next block starts at _start: drop documents that end before it.
            while len(self._docs) > 1 and self._docs[1][1] <= self._start:
                self._docs.popleft()
            key0, begin = self._docs[0]
            yield block, (key0, self._start - begin)

    def _append(self, tokens: np.ndarray) -> None:
        n = len(tokens)
        if self._end + n > len(self._buf):
            # Compact: move the live tokens to the front, growing the buffer for a long piece.
            live = self._end - self._start
            size = max(len(self._buf), 2 * (live + n))
            buf = np.empty(size, np.int64) if size > len(self._buf) else self._buf
            buf[:live] = self._buf[self._start : self._end]
            shift = self._start
            self._buf, self._start, self._end = buf, 0, live
            self._docs = deque((k, b - shift) for k, b in self._docs)
        self._buf[self._end : self._end + n] = tokens
        self._end += n
