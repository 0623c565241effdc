"""The tokenizer files of a Hugging Face export: what the run's data was tokenized with, for
`AutoTokenizer.from_pretrained(export)` offline.

tokenizer.json comes from `pile_prep.tokenizer.hf_tokenizer_json`: built from the bundled Qwen2.5
ranks for data tokenized with `qwen2.5` (nothing downloaded), from the user's files for a
tokenizer directory. Every added token is marked special and tokenizer_config.json sets
`split_special_tokens`, so transformers encodes a literal "<|endoftext|>" or "<tool_call>" inside
a text as ordinary text, exactly as pile-prep did when it tokenized the training data.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pile_prep.tokenizer import DEFAULT_TOKENIZER

FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def write_tokenizer(text: str, spec: str, eos_id: int, max_length: int, directory: Path) -> None:
    """Write FILES for the tokenizer `spec` (`qwen2.5` or an existing tokenizer path), whose
    tokenizer.json is `text` (`hf_tokenizer_json(spec)`), into `directory`: EOS = pad = the token
    of `eos_id` (the id the data ends documents with)."""
    (directory / "tokenizer.json").write_text(text, encoding="utf-8")
    eos = _token_of(json.loads(text), eos_id)
    config = _source_config(spec)
    config.pop("added_tokens_decoder", None)  # tokenizer.json holds them (all special)
    config.pop("auto_map", None)
    default_class = "Qwen2Tokenizer" if spec == DEFAULT_TOKENIZER else "PreTrainedTokenizerFast"
    config.update({
        "tokenizer_class": config.get("tokenizer_class", default_class),
        "eos_token": eos,
        "pad_token": config.get("pad_token") or eos,
        "bos_token": config.get("bos_token"),
        "unk_token": config.get("unk_token"),
        "model_max_length": max_length,
        # literal added-token strings in a text are text, as pile-prep encodes them
        "split_special_tokens": True,
        "clean_up_tokenization_spaces": False,
        "add_prefix_space": False,
        "errors": "replace",
    })  # fmt: skip
    _write_json(directory / "tokenizer_config.json", config)
    special = {k: config[k] for k in ("bos_token", "eos_token", "pad_token", "unk_token") if config[k] is not None}
    _write_json(directory / "special_tokens_map.json", special)


def _token_of(spec: dict[str, Any], token_id: int) -> str:
    for added in spec["added_tokens"]:
        if added["id"] == token_id:
            return added["content"]
    vocab = spec["model"]["vocab"]
    for token, i in vocab.items():
        if i == token_id:
            return token
    raise ValueError(f"tokenizer has no id {token_id} (the data's EOS id)")


def _source_config(spec: str) -> dict[str, Any]:
    """The tokenizer_config.json next to a user's tokenizer files (chat template, class), or {}."""
    if spec == DEFAULT_TOKENIZER:
        return {}
    path = Path(spec)
    path = (path if path.is_dir() else path.parent) / "tokenizer_config.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")
