"""The ``walsh`` console script. Subcommands import their modules lazily so ``--help`` is fast."""

from __future__ import annotations

import argparse
import sys


def _command(sub, name: str, help: str, add_arguments, func) -> None:
    p = sub.add_parser(name, help=help)
    add_arguments(p)
    p.set_defaults(func=func)


def _group(sub, name: str, help: str):
    return sub.add_parser(name, help=help).add_subparsers(dest=f"{name}_command", required=True)


def build_parser() -> argparse.ArgumentParser:
    from data_prep import cli as data_cli
    from pipeline import (
        bench_launch,
        bench_layer,
        bench_loss,
        bench_train,
        launch,
        model_cli,
        quickstart,
    )

    p = argparse.ArgumentParser(
        prog="walsh",
        description="Pretrain ternary hyper-complex structured language models.",
    )
    sub = p.add_subparsers(dest="command", required=True)

    data_cli.register(sub)  # walsh data stage|verify|inspect
    _command(sub, "train", "train a model (DeepSpeed ZeRO; Ray Train, torchrun or in-process)",
             launch.add_arguments, launch.main)
    _command(sub, "quickstart", "stage the builtin corpus, train tiny, sample",
             quickstart.add_arguments, quickstart.main)

    model = _group(sub, "model", "inspect presets, run a smoke test")
    _command(model, "info", "print a preset's config, parameters and FLOPs",
             model_cli.add_info_arguments, model_cli.info)
    _command(model, "smoke", "train a tiny model on a pattern, then generate",
             model_cli.add_smoke_arguments, model_cli.smoke)

    bench = _group(sub, "bench", "benchmarks that print figures")
    _command(bench, "train", "tok/s and peak memory of training steps",
             bench_train.add_arguments, bench_train.main)
    _command(bench, "layer", "one structured layer and its kernels against a roofline (CUDA)",
             bench_layer.add_arguments, bench_layer.main)
    _command(bench, "launch", "one Walsh pass over a grid of launches and block mixes (CUDA)",
             bench_launch.add_arguments, bench_launch.main)
    _command(bench, "loss", "peak memory of the chunked vs the full cross-entropy",
             bench_loss.add_arguments, bench_loss.main)
    data_cli.register_bench(bench)  # walsh bench staging
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # `walsh train CONFIG --launcher torchrun a.b=1`: overrides after options land in `extra`
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-")
                                                    for e in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        args.func(args)
    except (ValueError, KeyError) as err:  # config errors: one clear line, no traceback
        msg = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"walsh: error: {msg}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
