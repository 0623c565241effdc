"""The domains proxy (`pile-prep sample --kind domains`) at test scale, and a plain training loop.

The corpus goes through the real pipeline (write -> `pile-prep tokenize` with the corpus's word
tokenizer -> ShardDataset): ids 0..127 are words, 128 is EOS, so a tiny model's vocabulary is 129
and its MLP/MoE, not Qwen's 151,936-row output layer, is most of its compute.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ioe_train.data import read_windows
from ioe_train.packing import pack
from pile_prep.reader import ShardDataset
from pile_prep.sample import DOMAIN_TOKENIZER, DomainCorpus, write_domain_corpus
from pile_prep.tokenize import TokenizeOptions, tokenize

SEQ_LEN = 64
CORPUS = DomainCorpus(mean_words=32.0)  # 8 domains, 128 words, 2 successors; short documents keep tests fast
VOCAB = CORPUS.words + 1  # words + EOS


def make_domain_shards(root: Path) -> tuple[Path, Path]:
    """(train, val) shard directories of the proxy: 4000 + 400 documents, ~130k + 13k tokens."""
    paths = write_domain_corpus(root / "raw", CORPUS, num_files=1, docs_per_file=4000)
    tok = str(root / "raw" / DOMAIN_TOKENIZER)
    dirs = root / "train", root / "val"
    for path, out in zip(paths[:2], dirs):
        tokenize(TokenizeOptions(inputs=[str(path)], output=out, workers=1, tokenizer=tok, progress=False))
    return dirs


def windows(directory: Path) -> torch.Tensor:
    """Every window of SEQ_LEN + 1 tokens of the shards, in stream order: [N, SEQ_LEN + 1]."""
    packed = pack(ShardDataset(directory), "stream", SEQ_LEN, seed=0, cache_dir=None)
    return read_windows(packed, np.arange(packed.num_windows))


def train_and_validate(model: torch.nn.Module, train: torch.Tensor, val: torch.Tensor, steps: int,
                       seed: int = 0, batch_size: int = 16, lr: float = 1e-2) -> float:  # fmt: skip
    """AdamW with 20 warmup steps times a cosine to lr / 10 (close to, not exactly, the trainer's
    schedule); returns the val loss."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    gen = torch.Generator().manual_seed(seed)
    for step in range(steps):
        scale = min(1.0, (step + 1) / 20) * (0.1 + 0.45 * (1 + math.cos(math.pi * step / steps)))
        for group in opt.param_groups:
            group["lr"] = lr * scale
        batch = train[torch.randint(0, len(train), (batch_size,), generator=gen)]  # [B, S + 1]
        logits, router_loss, aux_loss = model(batch[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten()) + router_loss + 0.01 * aux_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        logits, _, _ = model(val[:, :-1])
    model.train()
    return F.cross_entropy(logits.flatten(0, 1), val[:, 1:].flatten()).item()
