"""pile_prep: tokenize The Pile into memory-mapped uint32 shards (docs/FORMAT.md)."""

from pile_prep.tokenize import TokenizeError, TokenizeOptions, TokenizeSummary, tokenize
from pile_prep.tokenizer import QWEN2_5_EMBEDDING_SIZE, Tokenizer, TokenizerError, load_tokenizer

__all__ = [
    "QWEN2_5_EMBEDDING_SIZE",
    "TokenizeError",
    "TokenizeOptions",
    "TokenizeSummary",
    "Tokenizer",
    "TokenizerError",
    "load_tokenizer",
    "tokenize",
]
