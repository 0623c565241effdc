"""`pile-prep`: thin click commands over the typed functions of pile_prep."""

from __future__ import annotations

from pathlib import Path

import click

from pile_prep.export import ExportError, export_megatron
from pile_prep.sample import (
    DOMAIN_TOKENIZER,
    DOMAIN_WORDS,
    DomainCorpus,
    domain_val_documents,
    packing_continuity,
    write_domain_corpus,
    write_sample_corpus,
)
from pile_prep.tokenize import DEFAULT_SHARD_BYTES, TokenizeError, TokenizeOptions, tokenize
from pile_prep.tokenizer import DEFAULT_TOKENIZER, TokenizerError


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Tokenize The Pile into memory-mapped uint32 shards, and inspect or verify them."""


@main.command("tokenize")
@click.argument("inputs", nargs=-1, required=True)
@click.option("--output", "-o", type=click.Path(path_type=Path), required=True,
              help="Output directory (created; rerun the same command to resume).")
@click.option("--workers", "-j", type=click.IntRange(min=0), default=0, show_default=True,
              help="Tokenizer processes; 0 = all usable cores.")
@click.option("--tokenizer", default=DEFAULT_TOKENIZER, show_default=True,
              help="'qwen2.5' (bundled, no download) or a path to tokenizer.json or to a "
                   "directory with tokenizer.json or vocab.json + merges.txt.")
@click.option("--text-field", default="text", show_default=True, help="JSON key / column of the text.")
@click.option("--shard-mb", type=click.FloatRange(min=0, min_open=True),
              default=DEFAULT_SHARD_BYTES / 2**20, show_default=True,
              help="MiB of input text per shard.")
@click.option("--skip-bad-lines", is_flag=True, help="Count and report bad lines instead of stopping.")
@click.option("--overwrite", is_flag=True, help="Delete the pile-prep files in OUTPUT and start again.")
@click.option("--num-tasks", type=click.IntRange(min=1), default=1, show_default=True,
              help="Split the work across this many machines (one output dir each): whole "
                   "files first, the rest by chunk.")
@click.option("--task-index", type=click.IntRange(min=0), default=0, show_default=True,
              help="This machine's share, in [0, num_tasks).")
@click.option("--recursive", "-r", is_flag=True,
              help="A directory INPUT also gives the files in its subdirectories.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def tokenize_cmd(inputs, output, workers, tokenizer, text_field, shard_mb, skip_bad_lines,
                 overwrite, num_tasks, task_index, recursive, quiet) -> None:  # fmt: skip
    """Tokenize INPUTS (.jsonl.zst/.jsonl/.jsonl.gz/.parquet files, dirs or globs) into shards.

    A directory gives the files directly inside it (--recursive: also in subdirectories)."""
    opts = TokenizeOptions(
        inputs=list(inputs), output=output, workers=workers, tokenizer=tokenizer,
        text_field=text_field, shard_bytes=int(shard_mb * 2**20), skip_bad_lines=skip_bad_lines,
        overwrite=overwrite, num_tasks=num_tasks, task_index=task_index, progress=not quiet,
        recursive=recursive,
    )  # fmt: skip
    try:
        s = tokenize(opts)
    except (TokenizeError, TokenizerError) as e:
        raise click.ClickException(str(e)) from None
    except KeyboardInterrupt:
        raise click.ClickException(f"interrupted: rerun the same command to resume {output}") from None
    t = s.manifest["totals"]
    rate = s.tokens_this_run / s.seconds if s.seconds else 0.0
    click.echo(
        f"{t['tokens']:,} tokens, {t['documents']:,} documents in {t['shards']} shards "
        f"({s.shards_resumed} already done) -> {output / 'manifest.json'}\n"
        f"this run: {s.tokens_this_run:,} tokens in {s.seconds:.1f} s ({rate / 1e6:.2f} M tokens/s, "
        f"{s.bytes_this_run / max(s.seconds, 1e-9) / 2**20:.1f} MiB/s of text); "
        f"peak worker memory {s.peak_worker_mb:.0f} MiB"
    )
    if t["skipped_empty"] or t["blank_lines"] or t["bad_lines"]:
        click.echo(f"skipped: {t['skipped_empty']} empty documents, {t['blank_lines']} blank lines, "
                   f"{t['bad_lines']} bad lines")
        for b in s.manifest["bad_lines"][:10]:
            click.echo(f"  {b['file']}, line {b['line']}: {b['reason']}")


@main.command("sample")
@click.argument("directory", type=click.Path(path_type=Path))
@click.option("--kind", type=click.Choice(["text", "domains"]), default="text", show_default=True,
              help="text: mixed synthetic text (tokenizer cases); domains: the router research proxy "
                   "(K hidden Markov-chain domains; docs/MOE.md#the-domains-proxy).")
@click.option("--files", type=click.IntRange(min=1), default=None,
              help="Training files [default: 2 for text, 1 for domains].")
@click.option("--docs", type=click.IntRange(min=1), default=None,
              help="Documents per training file (val gets a tenth) [default: 2000 for text; 2400 for "
                   "domains: ~620k tokens, one epoch of configs/proxy_*.yaml].")
@click.option("--domains", type=click.IntRange(min=1), default=DomainCorpus.domains, show_default=True,
              help="domains: K, the hidden domains (pile_set_name domain_00..).")
@click.option("--words", type=click.IntRange(min=1, max=len(DOMAIN_WORDS)), default=DomainCorpus.words,
              show_default=True, help="domains: V, the shared word set.")
@click.option("--successors", type=click.IntRange(min=1), default=DomainCorpus.successors,
              show_default=True, help="domains: b, the successors of a word in one domain.")
@click.option("--mean-words", type=click.FloatRange(min=1), default=DomainCorpus.mean_words,
              show_default=True, help="domains: mean document length in words.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--seq-len", type=click.IntRange(min=1), default=64, show_default=True,
              help="domains: window length for the packing report (configs/proxy_*.yaml's).")
@click.option("--segment-len", type=click.IntRange(min=1), default=16, show_default=True,
              help="domains: IoE segment length for the packing report (configs/proxy_ioe.yaml's).")
def sample_cmd(directory, kind, files, docs, domains, words, successors, mean_words, seed, seq_len,
               segment_len) -> None:  # fmt: skip
    """Write a small synthetic Pile-format corpus (00.jsonl.zst.., val.jsonl.zst)."""
    files = files or (2 if kind == "text" else 1)
    docs = docs or (2000 if kind == "text" else 2400)
    if kind == "text":
        paths = write_sample_corpus(directory, files, docs, seed)
    else:
        try:
            corpus = DomainCorpus(domains, words, successors, mean_words, seed)
        except ValueError as e:
            raise click.UsageError(str(e)) from None
        paths = write_domain_corpus(directory, corpus, files, docs)
    for path in paths:
        click.echo(f"{path} ({path.stat().st_size:,} bytes)")
    if kind == "domains":
        val = domain_val_documents(corpus, docs)
        click.echo(f"best loss per token: {corpus.entropy_rate():.4f} nats knowing each document's domain; "
                   f"{corpus.bayes_loss(val):.4f} on val.jsonl.zst inferring it from the document so far. "
                   f"Tokenize with --tokenizer {directory / DOMAIN_TOKENIZER} (vocabulary {words + 1}) "
                   "or the default qwen2.5 (one token per word either way).")
        train = [doc for i in range(files) for doc in corpus.documents(docs, i)]
        tokens = sum(len(words) + 1 for _, words in train)
        click.echo(f"training data: {tokens:,} tokens in {len(train):,} documents of {tokens / len(train):.0f} "
                   f"tokens on average. Routed {segment_len}-token segments of {seq_len}-token windows whose "
                   "previous segment lies wholly in their own document / domain, per data.packing:")
        for packing, (doc, domain) in packing_continuity(train, words, seq_len, segment_len).items():
            click.echo(f"  {packing:<10} {doc:6.1%} / {domain:6.1%}")


@main.command("inspect")
@click.argument("dirs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--decode", type=click.IntRange(min=0), default=0, metavar="N",
              help="Show the first N documents decoded, with their source.")
@click.option("--doc", "docs", type=int, multiple=True, metavar="I",
              help="Show document I (repeatable; negative counts from the end).")
@click.option("--tokens", "show_tokens", is_flag=True,
              help="Show each shown document's ids next to their text pieces.")
@click.option("--tokenizer", default=None, metavar="PATH",
              help="Tokenizer files for decoding, when the shards were not made with qwen2.5.")
@click.option("--json", "as_json", is_flag=True, help="Print the same facts as JSON.")
@click.option("--partial", is_flag=True,
              help="Accept DIRS missing some tasks of a --num-tasks job (on purpose).")
def inspect_cmd(dirs, decode, docs, show_tokens, tokenizer, as_json, partial) -> None:
    """Summarize shard directories DIRS (read as one dataset): sizes, sources, lengths."""
    from pile_prep.inspect import inspect_report
    from pile_prep.reader import ShardError

    try:
        click.echo(inspect_report(dirs, decode, docs, show_tokens, tokenizer, as_json, partial))
    except (ShardError, TokenizerError, IndexError) as e:
        raise click.ClickException(str(e)) from None


@main.group("export")
def export_group() -> None:
    """Write shard directories in another framework's format."""


@export_group.command("megatron")
@click.argument("dirs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--output", "-o", "prefix", required=True, type=click.Path(path_type=Path),
              metavar="PREFIX", help="Writes PREFIX.bin and PREFIX.idx.")
@click.option("--partial", is_flag=True,
              help="Accept DIRS missing some tasks of a --num-tasks job (on purpose).")
@click.option("--overwrite", is_flag=True, help="Replace an existing PREFIX.bin / PREFIX.idx.")
def export_megatron_cmd(dirs, prefix, partial, overwrite) -> None:
    """Megatron-LM / NeMo / GPT-NeoX indexed dataset of DIRS: one sequence per document."""
    try:
        s = export_megatron(dirs, prefix, partial, overwrite)
    except ExportError as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"{s.documents:,} documents, {s.tokens:,} tokens -> {s.bin_path}, {s.idx_path} "
               f"({s.seconds:.1f} s)")  # fmt: skip


@main.command("verify")
@click.argument("dirs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--workers", "-j", type=click.IntRange(min=0), default=0, show_default=True,
              help="Processes checking shards; 0 = auto (all usable cores for large data).")
@click.option("--sample", type=click.IntRange(min=0), default=0, metavar="K",
              help="Also re-tokenize K documents from the original inputs (needs --source).")
@click.option("--source", "sources", multiple=True, metavar="INPUT",
              help="The tokenize INPUTs (files, dirs or globs; repeatable), for --sample.")
@click.option("--seed", type=int, default=0, show_default=True, help="Which documents --sample picks.")
@click.option("--tokenizer", default=None, metavar="PATH",
              help="Tokenizer files for --sample, when the shards were not made with qwen2.5.")
@click.option("--partial", is_flag=True,
              help="Accept DIRS missing some tasks of a --num-tasks job (on purpose).")
def verify_cmd(dirs, workers, sample, sources, seed, tokenizer, partial) -> None:
    """Check every checksum, size, EOS, id and total of DIRS; exit 1 naming each problem."""
    from pile_prep.verify import verify

    if sample and not sources:
        raise click.UsageError("--sample needs --source INPUT... (the files given to tokenize)")
    report = verify(dirs, workers, sample, sources, seed, tokenizer, partial=partial)
    click.echo(report.format())
    raise SystemExit(0 if report.ok else 1)


if __name__ == "__main__":
    main()
