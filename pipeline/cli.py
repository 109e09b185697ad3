"""The ``walsh`` console script. Subcommands import their modules lazily so ``--help`` is fast."""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    from data_prep import cli as data_cli
    from pipeline import bench_loss, bench_train, launch, model_cli, quickstart

    p = argparse.ArgumentParser(
        prog="walsh",
        description="Pretrain ternary hyper-complex structured language models.",
    )
    sub = p.add_subparsers(dest="command", required=True)

    data_cli.register(sub)  # walsh data stage|verify|inspect

    train = sub.add_parser("train", help="train a model (DeepSpeed ZeRO; torchrun launcher)")
    launch.add_arguments(train)
    train.set_defaults(func=launch.main)

    qs = sub.add_parser("quickstart", help="stage the builtin corpus, train tiny, sample")
    quickstart.add_arguments(qs)
    qs.set_defaults(func=quickstart.main)

    model = sub.add_parser("model", help="inspect presets, run a smoke test").add_subparsers(
        dest="model_command", required=True
    )
    info = model.add_parser("info", help="print a preset's config, parameters and FLOPs")
    model_cli.add_info_arguments(info)
    info.set_defaults(func=model_cli.info)
    smoke = model.add_parser("smoke", help="train a tiny model on a pattern, then generate")
    model_cli.add_smoke_arguments(smoke)
    smoke.set_defaults(func=model_cli.smoke)

    bench = sub.add_parser("bench", help="benchmarks that print figures").add_subparsers(
        dest="bench_command", required=True
    )
    btrain = bench.add_parser("train", help="tok/s and peak memory of training steps")
    bench_train.add_arguments(btrain)
    btrain.set_defaults(func=bench_train.main)
    loss = bench.add_parser("loss", help="peak memory of the chunked vs the full cross-entropy")
    bench_loss.add_arguments(loss)
    loss.set_defaults(func=bench_loss.main)
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
