"""Per-process entry point: ``python -m pipeline.train_entry CONFIG [key=value ...]``.

This is what ``walsh train --launcher torchrun`` starts in every process, and what a cluster
without Ray runs directly, e.g. on each node::

    torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HOST:29500 \\
        -m pipeline.train_entry configs/train/fineweb-walsh-o-125m.yaml

(the ``deepspeed`` launcher works the same way with ``--module pipeline.train_entry``).
"""

from __future__ import annotations

import argparse
import sys

from pipeline.config_load import load


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeline.train_entry")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    p.add_argument("--trace-data", action="store_true",
                   help="record a sha1 of every consumed micro batch under RUN_DIR/data_trace/")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None,
                   help=argparse.SUPPRESS)  # passed by the deepspeed launcher
    args = p.parse_args(argv)
    from pipeline.trainer import train

    train(load(args.config, args.overrides), trace_data=args.trace_data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
