#!/bin/bash
# FID of the mnist run at small counts (docs/EVALUATION.md): 500 samples and 1,000 real training images
# against the 1,000 held-out images. Run from anywhere after `python benchmarks/mnist.py run`; writes to $OUT.
set -e
RUN="$(cd "$(dirname "$0")/.." && pwd)/out/mnist/run"
OUT="${OUT:-/tmp/fidm}"
mkdir -p "$OUT" && cd "$OUT"
export OMP_NUM_THREADS=2
python - <<'PY'
import os, numpy as np
from PIL import Image
from mpdiff.data.digits import load_builtin_mnist
p = load_builtin_mnist()
rng = np.random.default_rng(0)
for name, images in (("heldout", p["test_images"]), ("train1000", p["train_images"][rng.choice(4000, 1000, replace=False)])):
    os.makedirs(name, exist_ok=True)
    for i, im in enumerate(images):
        Image.fromarray(im[0]).save(f"{name}/{i:04d}.png")
PY
date
mpdiff generate "$RUN" --sigma-rel 0.05 --seeds 0-499 --sampler heun --steps 32 --out samples --no-progress
date
mpdiff ref heldout --out heldout-fid.npz --metrics fid --no-progress
date
mpdiff metrics --images samples --ref heldout-fid.npz --metrics fid --json --no-progress > fid-samples.json
date
mpdiff metrics --images train1000 --ref heldout-fid.npz --metrics fid --json --no-progress > fid-real.json
date
cat fid-samples.json fid-real.json
