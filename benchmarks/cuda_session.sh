#!/usr/bin/env bash
# One prepared run for a lent GPU (issue 20, item 5): the CUDA rows of BENCHMARKS.md in about
# 10 minutes. Run from the repository root with the project's Python on PATH (or PYTHON=...):
#
#     bash benchmarks/cuda_session.sh            # results in benchmarks/out/*_cuda*
#
# (the launch proxy, kernel.py --counts, needs no GPU: its counts are already in BENCHMARKS.md)
# 1. kernel.py --cuda-only: Boruvka trees at n = 4096 and 16384 on the GPU (edges against numba,
#    sync-free check, eager and torch.compile reduce-overhead), the 17-tree batch, the fused pipeline,
# 2. architectures.py --device cuda: resnet18 and GPT-2 small (plus the GPT stack), plain vs
#    regularised steps, interleaved.
# Each step has its own time limit, so one stuck step does not cost the others.
set -u
PY=${PYTHON:-python}
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available())"
timeout 300 "$PY" benchmarks/kernel.py --cuda-only --sizes 4096 16384 --repeats 10 --name kernel_cuda \
    || echo "kernel --cuda-only: exit $?"
timeout 300 "$PY" benchmarks/architectures.py --device cuda --quick --models resnet18,gpt \
    || echo "architectures: exit $?"
ls -l benchmarks/out/
