#!/usr/bin/env bash
# Weak scaling of the three 125M presets on the GPUs of one host (issue 6's run), without Ray:
# torchrun, 300 steps of 16 x 1024 tokens per GPU per optimizer step, ZeRO 1-3 on NGPU GPUs
# against ZeRO-0 on one GPU at the same per-GPU batch; checkpoints at steps 150 and 300 (their
# save and load times are in each run's metrics.jsonl as checkpoint_s / checkpoint_load_s).
# On an offline box carry .whl and a staged data/python-docs as for gpu-throughput.sh, then
#   bash launch/gpu-scaling.sh [NGPU] [extra key=value overrides ...]
# The trainer itself turns NVLink multicast off in every process (cluster.nvlink_multicast);
# the exports below also cover torchrun's own agent.
set -euo pipefail
ngpu=${1:-2}; shift || true
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
run() {  # NAME NPROC PRESET STAGE GLOBAL_BATCH [overrides ...]
  local name=$1 n=$2 p=$3 z=$4 gb=$5; shift 5
  python3 -m torch.distributed.run --standalone --nproc_per_node="$n" -m pipeline.train_entry \
    "configs/train/gpu-throughput-$p.yaml" train.zero_stage="$z" train.global_batch="$gb" \
    train.steps=300 train.log_interval=25 train.ckpt_interval=150 train.eval_interval=150 \
    train.keep_last=2 train.run_dir="runs/scaling/$name" "$@"
  grep '"tokens_per_s"' "runs/scaling/$name/metrics.jsonl" | tail -2
}
for p in dense-125m walsh-o-125m walsh-h-125m; do
  run "$p-1gpu-z0" 1 "$p" 0 16 "$@"
  for z in 1 2 3; do run "$p-${ngpu}gpu-z$z" "$ngpu" "$p" "$z" $((16 * ngpu)) "$@"; done
done
