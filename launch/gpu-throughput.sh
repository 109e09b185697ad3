#!/usr/bin/env bash
# Trainer throughput of the three 125M presets on one GPU, without Ray (torchrun), e.g. on an
# offline GPU box whose image lacks deepspeed/webdataset/pydantic: build the wheels first with
# ../shared/tools/gpu-wheels.sh .whl, carry .whl and a staged data/python-docs, then run
#   bash launch/gpu-throughput.sh
set -euo pipefail
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
for p in dense-125m walsh-o-125m walsh-h-125m; do
  python3 -m torch.distributed.run --standalone --nproc_per_node=1 -m pipeline.train_entry \
    "configs/train/gpu-throughput-$p.yaml" "$@"
  grep '"tokens_per_s"' "runs/gpu-throughput-$p/metrics.jsonl" | tail -3
done
