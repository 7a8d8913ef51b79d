#!/usr/bin/env bash
# Issue 18's GPU checks in one call of a lent GPU machine (at most 8 minutes by the timeouts below):
#   1. the CUDA tests: tests/test_gpu.py (bf16/fp16, compiled training, frozen sampling, SDPA) and the
#      other tests that need CUDA (fp16 networks, the no-synchronisation training step);
#   2. edm2-img512-s side by side with NVIDIA's network (benchmarks/vs_edm2.py --device cuda): training
#      and sampling img/s against NVIDIA's own fp16 mode, MFU against the measured bf16 matmul peak.
#
#   bash benchmarks/gpu_checks.sh EDM2_CHECKOUT [OUT_DIR]
#
# EDM2_CHECKOUT is a checkout of github.com/NVlabs/edm2 (never committed here). From a session with the
# device tool: copy one to out/edm2-ref (ignored by git), then run this script with carry=["out/edm2-ref"]
# and OUT_DIR=$OUT; docs/PERFORMANCE.md says where the results go.
set -uo pipefail
cd "$(dirname "$0")/.."
EDM2=${1:?give a checkout of NVlabs/edm2}
OUT_DIR=${2:-out/gpu-checks}
mkdir -p "$OUT_DIR"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT_DIR/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUT_DIR/gpu.txt"

# -p no:cacheprovider: nothing written into the tree; -n 0: one process owns the GPU.
timeout 200 python3 -m pytest -q -n 0 -p no:cacheprovider -rs tests/test_gpu.py \
    tests/test_reliability.py::test_a_cuda_step_does_not_synchronise \
    tests/test_network.py::test_fp16_on_cuda_close_to_fp32 \
    tests/test_ladder.py::test_each_config_fp16_on_cuda_close_to_fp32 2>&1 | tee "$OUT_DIR/tests.txt"

# One compiled setting (bf16, the fastest on the CPU): each compile of the S network costs minutes.
timeout 280 python3 benchmarks/vs_edm2.py --edm2 "$EDM2" --config img512-s --device cuda --rounds 3 \
    --sample-steps 8 --compile --settings "nvidia fp16,ours fp32,ours bf16,ours fp16,ours compile bf16" \
    --out "$OUT_DIR" 2>&1 | tee "$OUT_DIR/vs_edm2.txt"
