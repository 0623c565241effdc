"""pile_prep: tokenize The Pile into memory-mapped uint32 shards (docs/FORMAT.md)."""

from pile_prep.export import ExportError, export_megatron
from pile_prep.reader import ShardDataset, ShardError
from pile_prep.tokenize import TokenizeError, TokenizeOptions, TokenizeSummary, tokenize
from pile_prep.tokenizer import QWEN2_5_EMBEDDING_SIZE, Tokenizer, TokenizerError, load_tokenizer
from pile_prep.verify import Problem, VerifyReport, verify

__all__ = [
    "ExportError",
    "Problem",
    "QWEN2_5_EMBEDDING_SIZE",
    "ShardDataset",
    "ShardError",
    "TokenizeError",
    "TokenizeOptions",
    "TokenizeSummary",
    "Tokenizer",
    "TokenizerError",
    "VerifyReport",
    "export_megatron",
    "load_tokenizer",
    "tokenize",
    "verify",
]
