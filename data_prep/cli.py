"""``walsh data stage|verify|inspect`` and ``walsh bench staging``.

Heavy imports (Ray, datasets, tiktoken) happen inside the handlers so ``walsh --help`` stays
fast. Errors meant for the user are ValueErrors: the ``walsh`` entry point prints them as one
line and exits with status 2.
"""

from __future__ import annotations

import argparse
import sys


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``data`` command group to the ``walsh`` parser."""
    data = sub.add_parser("data", help="stage, verify and inspect token shards").add_subparsers(
        dest="data_command", required=True)

    st = data.add_parser(
        "stage", help="tokenize a corpus into webdataset shards (Ray)",
        description="Stage a corpus: CONFIG (YAML, see configs/data/) and/or flags; flags "
                    "override the config.")
    st.add_argument("config", nargs="?", help="staging config (YAML)")
    st.add_argument("--source", nargs="+", metavar="SRC",
                    help="builtin:python-docs | hub:REPO (e.g. hub:HuggingFaceFW/fineweb-edu) "
                         "| local parquet/jsonl[.gz]/txt files, folders or globs")
    st.add_argument("--out", help="output directory")
    st.add_argument("--tokenizer", help="tiktoken name (default r50k_base) or ranks file path")
    st.add_argument("--workers", type=int, help="parallel tasks (default: all CPUs)")
    st.add_argument("--address", help="Ray cluster address (default: a local Ray)")
    st.add_argument("--subset", help="hub: subset (default sample-10BT)")
    st.add_argument("--revision", help="hub: revision (default main)")
    st.add_argument("--text-field", help="column / JSON field holding the text (default text)")
    st.add_argument("--format", choices=["auto", "parquet", "jsonl", "txt"])
    st.add_argument("--separator", help="txt: string between documents (default: one per file)")
    st.add_argument("--max-docs", type=int, help="stop after this many documents")
    st.add_argument("--max-tokens", type=int, help="stop after this many tokens")
    st.add_argument("--chunk-tokens", type=int, help="tokens per chunk (default 65536)")
    st.add_argument("--shard-mb", type=float, help="shard size in MB (default 256)")
    st.add_argument("--val-fraction", type=float, help="share of documents for val")
    st.add_argument("--min-int-score", type=int, help="filter: minimum int_score")
    st.add_argument("--language", nargs="+", dest="languages", help="filter: languages")
    st.add_argument("--min-chars", type=int, help="filter: minimum characters")
    st.add_argument("--keep-parts", action="store_true", default=None,
                    help="keep the per-input parts after packing")
    st.add_argument("--no-progress", action="store_true", help="no progress bars")
    st.set_defaults(func=stage_command)

    ve = data.add_parser("verify", help="re-hash shards and recount tokens against the manifest")
    ve.add_argument("dir")
    ve.add_argument("--no-decode", action="store_true", help="do not decode a sample")
    ve.set_defaults(func=verify_command)

    ins = data.add_parser("inspect", help="statistics and a decoded sample")
    ins.add_argument("dir")
    ins.add_argument("--split", default="train")
    ins.add_argument("--index", type=int, default=0, help="chunk to decode")
    ins.add_argument("--tokens", type=int, default=200, help="tokens to decode")
    ins.set_defaults(func=inspect_command)


def register_bench(bench: argparse._SubParsersAction) -> None:
    """Add ``bench staging`` to the ``walsh bench`` group."""
    from data_prep import bench as bench_mod  # light: its heavy imports are inside main

    b = bench.add_parser("staging", help="staging tokens/s next to bare tiktoken throughput")
    bench_mod.add_arguments(b)
    b.set_defaults(func=bench_mod.main)


def config_from_args(args: argparse.Namespace):
    """The YAML config (if any) with the flags on top."""
    from data_prep import config as cfg

    raw: dict = {}
    where = "command line"
    if args.config:
        raw = cfg.read_yaml(args.config)
        where = args.config
    src_opts = {"subset": args.subset, "revision": args.revision, "text_field": args.text_field,
                "format": args.format, "separator": args.separator}
    if args.source:
        raw["source"] = cfg.parse_source(args.source, **src_opts)
    elif isinstance(raw.get("source"), dict):
        raw["source"].update({k: v for k, v in src_opts.items() if v is not None})
    elif not args.config:
        raise ValueError("walsh data stage: give a CONFIG or --source SRC --out DIR")
    top = {"out": args.out, "tokenizer": args.tokenizer, "workers": args.workers,
           "max_docs": args.max_docs, "max_tokens": args.max_tokens,
           "keep_parts": args.keep_parts}
    nested = {"packing": {"chunk_tokens": args.chunk_tokens, "shard_mb": args.shard_mb},
              "split": {"val_fraction": args.val_fraction},
              "filters": {"min_int_score": args.min_int_score, "languages": args.languages,
                          "min_chars": args.min_chars}}
    raw.update({k: v for k, v in top.items() if v is not None})
    for section, values in nested.items():
        values = {k: v for k, v in values.items() if v is not None}
        if values:
            raw[section] = {**raw.get(section, {}), **values}
    if "out" not in raw:
        raise ValueError("walsh data stage: --out DIR is required (or `out:` in the config)")
    return cfg.from_dict(raw, where)


def stage_command(args: argparse.Namespace) -> None:
    from data_prep.stage import stage

    config = config_from_args(args)
    stage(config, address=args.address, progress=not args.no_progress, log=print)
    print(f"next: walsh data verify {config.out}")


def verify_command(args: argparse.Namespace) -> None:
    from data_prep import verify

    report = verify.verify(args.dir)
    for c in report.checks:
        print(f"{c.shard.name}: {'ok' if not c.problems else 'FAILED'} "
              f"({c.samples} samples, {c.tokens:,} tokens)")
    for p in report.problems:
        print(f"  problem: {p}")
    if not report.ok:
        failed = [c.shard.name for c in report.checks if c.problems]
        totals = [p for p in report.problems if p.startswith("split ")]
        raise verify.VerifyError(
            f"{args.dir}: {len(report.problems)} problem(s) (listed above); shards failing: "
            f"{', '.join(failed) or 'none'}" + (f"; {'; '.join(totals)}" if totals else ""))
    total = sum(c.tokens for c in report.checks)
    print(f"{args.dir}: OK, {len(report.checks)} shards, {total:,} tokens match the manifest")
    if not args.no_decode:
        from data_prep.manifest import Manifest

        m = Manifest.load(args.dir)
        if m.shards:
            print(f"--- {m.shards[0].split} chunk 0, first 64 tokens ---")
            print(verify.decode_sample(m, m.shards[0].split, 0, 64))
    sys.stdout.flush()


def inspect_command(args: argparse.Namespace) -> None:
    from data_prep import verify

    print(verify.inspect(args.dir, split=args.split, index=args.index, n_tokens=args.tokens))
