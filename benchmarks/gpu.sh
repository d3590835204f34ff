#!/usr/bin/env bash
# The GPU runs of the benchmarks (issue 16), from the repository root:
#
#   benchmarks/gpu.sh                        # CUDA: writes benchmarks/results/*_cuda.*
#   benchmarks/gpu.sh --device cpu --quick --results-dir /tmp/gpu_check   # check it on a CPU
#
# 1. torchvision ResNets (resnet50/101/152) at batch 64, 3x224x224: every variant, eager
#    and torch.compile'd (torch_compile_budget), step time and peak step memory
#    (torch.cuda.max_memory_allocated, fresh process per variant);
# 2. memory against depth (CIFAR ResNets, batch 128): saved bytes and peak step memory;
# 3. torch.compile and revcompile (resnet50, batch 64, 224): eager and compiled, original
#    and converted: training step and inference time, saved bytes, max_memory_allocated.
#
# Options: --device DEV (default cuda), --quick (each script's smoke-test sizes),
# --results-dir DIR (default benchmarks/results). PYTHON selects the interpreter.
set -euo pipefail

device=cuda
quick=()
results=()
while (($#)); do
    case "$1" in
        --device) device="$2"; shift 2 ;;
        --quick) quick=(--quick); shift ;;
        --results-dir) results=(--results-dir "$2"); shift 2 ;;
        *) echo "gpu.sh: unknown option $1 (use --device DEV, --quick, --results-dir DIR)" >&2; exit 2 ;;
    esac
done
python=${PYTHON:-python}
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [[ $device == cuda* ]]; then
    "$python" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu.sh: torch sees no CUDA device; run with --device cpu to check the script')"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
fi

run() {
    echo "+ $*" >&2
    "$python" -m "$@" --device "$device" ${quick[@]+"${quick[@]}"} ${results[@]+"${results[@]}"}
}

# A --quick run sets its own small sizes (and overrides --batch).
run benchmarks.torchvision_models --batch 64
run benchmarks.memory_vs_depth
run benchmarks.compile --model resnet50 --batch 64 --size 224
