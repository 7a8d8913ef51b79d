"""Mutation check: does the test suite catch a wrong formula? (issue 28, point 3)

    python benchmarks/mutations.py                 # every mutation; exits 1 if any survives
    python benchmarks/mutations.py --only churn,cs-  # the mutations whose id contains 'churn' or 'cs-'
    python benchmarks/mutations.py --list          # print the mutations without running them

Each mutation below is one small change to a formula in src/mpdiff (a constant, a sign, an exponent,
a dropped square root, the direction of a lerp, which skip gets which power of kappa ...), as
(id, file, exact old text, new text, test files). For each, the checker copies src/ to a temporary
folder (the working tree is never touched: others run tests from it), asserts that the old text occurs
exactly once in the copied file, replaces it, and runs

    PYTHONPATH=<copy>/src python -m pytest -x -q -n 0 -p no:cacheprovider <test files>

from the repository root. A failing run means the mutation was caught. Before the mutations, the same
command runs once on an unmodified copy of src/, which must pass (otherwise every mutation would look
caught). The reference-fixture tests (tests/test_ref_edm2.py, tests/test_ref_scalelong.py) are added to
a mutation's files where they exist, and the check works without them.

It prints one row per mutation (caught / MISSED, seconds, the first failing test) and exits non-zero if
any mutation survives. A run takes a few minutes on the 2-core machine (one pytest process per mutation,
single-threaded; most of each run is importing torch).
"""

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from typing import NamedTuple, Tuple

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
FORMULAS = "tests/test_formulas.py"
REF_EDM2 = "tests/test_ref_edm2.py"            # used where present
REF_SCALELONG = "tests/test_ref_scalelong.py"  # used where present


class Mutation(NamedTuple):
    id: str
    file: str    # under src/mpdiff/
    old: str
    new: str
    tests: Tuple[str, ...] = (FORMULAS,)
    optional: Tuple[str, ...] = ()  # run too when the file exists


NET = (REF_EDM2,)
SL = (REF_SCALELONG,)

MUTATIONS = [
    # ---- §1.1 preconditioning
    Mutation("precond-c_skip-std", "nn/precond.py", "c_skip = data_var / total_var", "c_skip = data_var / total_std",
             optional=NET),
    Mutation("precond-c_out-var", "nn/precond.py", "c_out = sigma * sigma_data / total_std",
             "c_out = sigma * sigma_data / total_var", optional=NET),
    Mutation("precond-c_in-var", "nn/precond.py", "c_in = 1 / total_std", "c_in = 1 / total_var", optional=NET),
    Mutation("precond-c_noise-half", "nn/precond.py", "c_noise = sigma.log().flatten() / 4",
             "c_noise = sigma.log().flatten() / 2", optional=NET),
    # ---- §1.2-1.3 loss and sigma sampling
    Mutation("loss-weight-square", "diffusion/loss.py", "/ (sigma * sigma_data) ** 2", "/ (sigma * sigma_data)"),
    Mutation("loss-uncertainty-times-exp", "diffusion/loss.py", "(weight / logvar.exp())", "(weight * logvar.exp())"),
    Mutation("loss-uncertainty-minus-u", "diffusion/loss.py", "(denoised - images) ** 2 + logvar",
             "(denoised - images) ** 2 - logvar"),
    Mutation("sigma-sampling-swapped", "diffusion/loss.py", "* P_std + P_mean).exp()", "* P_mean + P_std).exp()"),
    # ---- §1.4 learning rate
    Mutation("lr-no-sqrt", "train/optim.py", "value /= math.sqrt(max(nimg / (decay * batch), 1))",
             "value /= max(nimg / (decay * batch), 1)"),
    Mutation("lr-min-not-max", "train/optim.py", "math.sqrt(max(nimg / (decay * batch), 1))",
             "math.sqrt(min(nimg / (decay * batch), 1))"),
    Mutation("lr-rampup-twice-as-long", "train/optim.py", "min(nimg / rampup_img, 1)",
             "min(nimg / (2 * rampup_img), 1)"),
    # ---- §2 MP primitives
    Mutation("normalize-eps", "nn/primitives.py", "NORM_EPS = 1e-4", "NORM_EPS = 1e-5", optional=NET),
    Mutation("normalize-no-sqrt-k", "nn/primitives.py", "inv_sqrt_k = math.sqrt(length.numel() / x.numel())",
             "inv_sqrt_k = length.numel() / x.numel()", optional=NET),
    Mutation("fast-normalize-no-sqrt-k", "nn/fast.py", "alpha=math.sqrt(length.numel() / x.numel())",
             "alpha=length.numel() / x.numel()", optional=NET),
    Mutation("pixel-norm-no-sqrt", "nn/fast.py", "squares.sum(dim=dim, keepdim=True).clamp_min(1e-30).sqrt()",
             "squares.sum(dim=dim, keepdim=True).clamp_min(1e-30)", optional=NET),
    Mutation("mp-silu-constant", "nn/primitives.py", "SILU_RMS = 0.596", "SILU_RMS = 0.586", optional=NET),
    Mutation("mp-sum-lerp-direction", "nn/primitives.py", "blend = a.lerp(b, t)", "blend = b.lerp(a, t)",
             optional=NET),
    Mutation("mp-sum-no-sqrt", "nn/primitives.py", "return blend / math.sqrt((1 - t) ** 2 + t ** 2)",
             "return blend / ((1 - t) ** 2 + t ** 2)", optional=NET),
    Mutation("mp-cat-widths-swapped", "nn/primitives.py",
             "overall * (1 - t) / math.sqrt(num_a), overall * t / math.sqrt(num_b)",
             "overall * (1 - t) / math.sqrt(num_b), overall * t / math.sqrt(num_a)", optional=NET),
    Mutation("mp-cat-fast-path-scale", "nn/fast.py", "torch.mul(b, scale_b, out=joined[:, a.shape[1]:])",
             "torch.mul(b, scale_a, out=joined[:, a.shape[1]:])", optional=NET),
    Mutation("fourier-amplitude", "nn/primitives.py", "amplitude = math.sqrt(2)", "amplitude = 2.0", optional=NET),
    Mutation("fourier-phase-pi", "nn/primitives.py", 'self.register_buffer("phases", 2 * math.pi * phases)',
             'self.register_buffer("phases", math.pi * phases)', optional=NET),
    Mutation("mpconv-gain-fan-in", "nn/primitives.py", "scaled = unit_rows * (gain / math.sqrt(self.fan_in))",
             "scaled = unit_rows * (gain / self.fan_in)", optional=NET),
    Mutation("mpconv-no-forced-wn", "nn/primitives.py", "self.weight.copy_(normalize(self.weight.to(torch.float32)))",
             "self.weight.copy_(self.weight.to(torch.float32))", optional=NET),
    Mutation("attention-pixel-major-scale", "nn/fast.py", "rms_plus_eps[1].mul_(math.sqrt(per_head))",
             "rms_plus_eps[1].mul_(per_head)", optional=NET),
    # ---- §2-3 config G's network (its constants, and their folding into conv gains)
    Mutation("mp-sum-factors-swapped", "nn/fast.py", "return (1 - t) / length, t / length",
             "return t / length, (1 - t) / length", optional=NET),
    Mutation("block-res-balance", "config.py", "res_balance: float = option(0.3,",
             "res_balance: float = option(0.35,", optional=NET),
    Mutation("block-fold-join", "nn/fast.py", "alpha=sum_factors(t)[0]", "alpha=sum_factors(t)[1]",
             optional=NET),
    Mutation("block-fold-silu", "nn/fast.py", "self.conv_res0(h, gain=1 / SILU_RMS)", "self.conv_res0(h, gain=SILU_RMS)",
             optional=NET),
    Mutation("block-conditioning-plus-one", "nn/unet.py", "h = h * (cond + 1)[:, :, None, None]",
             "h = h * cond[:, :, None, None]", optional=NET),
    Mutation("fast-block-conditioning-plus-one", "nn/fast.py", "scale = cond + 1", "scale = cond", optional=NET),
    Mutation("literal-resample-up-taps", "nn/primitives.py", "upsample_kernel = kernel_2d * 4",
             "upsample_kernel = kernel_2d * 2", optional=NET),
    Mutation("embed-label-sqrt", "nn/unet.py", "class_labels * math.sqrt(class_labels.shape[1])",
             "class_labels * class_labels.shape[1]", optional=NET),
    Mutation("embed-label-balance", "config.py", "label_balance: float = option(0.5,",
             "label_balance: float = option(0.4,", optional=NET),
    Mutation("unet-ones-channel", "nn/unet.py", "x.new_ones([x.shape[0], 1", "x.new_zeros([x.shape[0], 1",
             optional=NET),
    # ---- §5 EMA
    Mutation("ema-beta-exponent", "ema/profiles.py", "** (sigma_rel_to_gamma(sigma_rel) + 1)",
             "** sigma_rel_to_gamma(sigma_rel)", optional=NET),
    Mutation("ema-sigma-rel-formula", "ema/profiles.py", "np.sqrt((gamma + 1) / (gamma + 2) ** 2 / (gamma + 3))",
             "np.sqrt((gamma + 1) / (gamma + 2) ** 2 / (gamma + 4))"),
    Mutation("ema-gamma-cubic", "ema/profiles.py", "[1.0, 7.0, 16.0 - v, 12.0 - v]", "[1.0, 7.0, 16.0 - v, 11.0 - v]",
             optional=NET),
    Mutation("ema-inner-product-exponent", "ema/profiles.py", "np.where(t_a < t_b, gamma_b, -gamma_a)",
             "np.where(t_a < t_b, gamma_a, -gamma_b)", optional=NET),
    Mutation("ema-posthoc-unnormalised", "ema/profiles.py", "return coefficients / np.sum(coefficients, axis=0)",
             "return coefficients", optional=NET),
    Mutation("ema-tracker-lerp-direction", "ema/trackers.py",
             "average[name].lerp_(param.detach().to(torch.float32), 1 - beta)",
             "average[name].lerp_(param.detach().to(torch.float32), beta)"),
    # ---- §6 sampling
    Mutation("schedule-step-fraction", "diffusion/schedules.py", "i / (num_steps - 1)", "i / num_steps",
             optional=NET),
    Mutation("schedule-rho-power", "diffusion/schedules.py", "- sigma_max ** (1 / rho))) ** rho",
             "- sigma_max ** (1 / rho))) ** (rho + 1)", optional=NET),
    Mutation("heun-end-slope-only", "diffusion/samplers.py", "x_next = x + (t_next - t_hat) * (d + d_next) / 2",
             "x_next = x + (t_next - t_hat) * d_next", optional=NET),
    Mutation("heun-correction-level", "diffusion/samplers.py", "_call(step, x_next, t_next, labels)",
             "_call(step, x_next, t_hat, labels)", optional=NET),
    Mutation("churn-clamp", "diffusion/samplers.py", "min(S_churn / num_steps, math.sqrt(2) - 1)",
             "min(S_churn / num_steps, math.sqrt(2))", optional=NET),
    Mutation("churn-s-max-exclusive", "diffusion/samplers.py", "(S_max is None or sigma <= S_max)",
             "(S_max is None or sigma < S_max)", optional=NET),
    Mutation("churn-noise-std", "diffusion/samplers.py", "(t_hat ** 2 - t_cur ** 2) ** 0.5 * S_noise",
             "(t_hat - t_cur) * S_noise", optional=NET),
    Mutation("guidance-lerp-direction", "diffusion/guidance.py",
             "guide(x, sigma, labels).lerp(net(x, sigma, labels), guidance)",
             "net(x, sigma, labels).lerp(guide(x, sigma, labels), guidance)", optional=NET),
    # ---- §7.5 Frechet distance
    Mutation("frechet-trace-factor", "metrics/frechet.py", "- 2 * trace_sqrt_product(sigma1, sigma2)",
             "- trace_sqrt_product(sigma1, sigma2)"),
    Mutation("frechet-psd-root", "metrics/frechet.py", "(vectors * np.sqrt(_significant(values))) @ vectors.T",
             "(vectors * _significant(values)) @ vectors.T"),
    # ---- §9 ScaleLong
    Mutation("cs-power-i", "nn/skips.py", "tuple(kappa ** i for i in range(num_skips))",
             "tuple(kappa ** (i + 1) for i in range(num_skips))", optional=SL),
    Mutation("cs-uvit-skip-order", "nn/uvit.py", "index = len(self._skips) - 1 - j", "index = j", optional=SL),
    Mutation("cs-unet-skip-order", "nn/layout.py", "for spec in reversed(self.decoder) if spec.skip_from",
             "for spec in self.decoder if spec.skip_from", optional=SL),
    Mutation("cs-coefficient-lookup", "nn/skips.py", "return skip * self.coefficients[index]",
             "return skip * self.coefficients[-1 - index]", optional=SL),
    Mutation("cs-mp-balance-odds", "nn/skips.py", "odds = coefficient * t / (1 - t)",
             "odds = coefficient * (1 - t) / t"),
    Mutation("ls-no-relu", "nn/skips.py", "torch.sigmoid(self.second(torch.relu(self.first(squeezed))))",
             "torch.sigmoid(self.second(self.first(squeezed)))", optional=SL),
]


def test_files(mutation):
    return list(mutation.tests) + [f for f in mutation.optional if os.path.exists(os.path.join(ROOT, f))]


def copy_source(destination):
    shutil.copytree(os.path.join(ROOT, "src"), os.path.join(destination, "src"),
                    ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    return os.path.join(destination, "src")


def apply(mutation, src):
    path = os.path.join(src, "mpdiff", mutation.file)
    with open(path, encoding="utf-8") as f:
        text = f.read()
    count = text.count(mutation.old)
    if count != 1:
        raise SystemExit(f"{mutation.id}: the old text occurs {count} times in src/mpdiff/{mutation.file}, "
                         f"expected exactly once: {mutation.old!r}")
    with open(path, "w", encoding="utf-8") as f:
        f.write(text.replace(mutation.old, mutation.new))


def environment(src):
    env = dict(os.environ, PYTHONPATH=src, PYTHONDONTWRITEBYTECODE="1", OMP_NUM_THREADS="1")
    return env


def run_tests(src, files, timeout):
    """Run pytest on `files` against the package in `src`; returns (passed, seconds, first failure, output)."""
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-n", "0", "-p", "no:cacheprovider", *files]
    start = time.monotonic()
    try:
        done = subprocess.run(command, cwd=ROOT, env=environment(src), capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return False, time.monotonic() - start, "timed out", ""
    output = done.stdout + done.stderr
    failed = re.search(r"^(?:FAILED|ERROR) (\S+)", output, re.MULTILINE)
    first = failed.group(1) if failed else ("" if done.returncode == 0 else f"exit {done.returncode}")
    return done.returncode == 0, time.monotonic() - start, first, output


def check_copy_is_imported(src):
    """The copy, not the editable install, must be what `import mpdiff` finds."""
    found = subprocess.run([sys.executable, "-c", "import mpdiff; print(mpdiff.__file__)"], cwd=ROOT,
                           env=environment(src), capture_output=True, text=True, check=True).stdout.strip()
    if not found.startswith(src):
        raise SystemExit(f"PYTHONPATH={src} does not take precedence: mpdiff is imported from {found}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="", help="run the mutations whose id contains one of these "
                                                    "comma-separated texts")
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    parser.add_argument("--no-optional", action="store_true",
                        help="leave out the reference-fixture tests: each mutation must fail tests/test_formulas.py")
    parser.add_argument("--timeout", type=float, default=300, help="seconds per pytest run")
    args = parser.parse_args(argv)
    chosen = [m._replace(optional=()) if args.no_optional else m for m in MUTATIONS
              if any(part in m.id for part in args.only.split(","))]
    if args.list:
        for m in chosen:
            print(f"{m.id:32s} src/mpdiff/{m.file:24s} {' '.join(test_files(m))}")
        return 0
    with tempfile.TemporaryDirectory(prefix="mpdiff-mutations-") as scratch:
        baseline_src = copy_source(os.path.join(scratch, "baseline"))
        check_copy_is_imported(baseline_src)
        for m in chosen:  # every old text is found exactly once before anything runs
            apply(m, copy_source(os.path.join(scratch, "probe", m.id)))
        shutil.rmtree(os.path.join(scratch, "probe"), ignore_errors=True)
        union = sorted({f for m in chosen for f in test_files(m)})
        passed, seconds, first, output = run_tests(baseline_src, union, args.timeout)
        print(f"baseline (unmodified copy): {'passes' if passed else 'FAILS'} in {seconds:.0f} s: {' '.join(union)}")
        if not passed:
            print(output[-4000:])
            return 2
        rows, missed = [], []
        for m in chosen:
            src = copy_source(os.path.join(scratch, m.id))
            apply(m, src)
            passed, seconds, first, _ = run_tests(src, test_files(m), args.timeout)
            status = "MISSED" if passed else "caught"
            if passed:
                missed.append(m.id)
            rows.append((m.id, m.file, status, seconds, first))
            print(f"{m.id:32s} {m.file:24s} {status:7s} {seconds:5.1f} s  {first}", flush=True)
            shutil.rmtree(os.path.join(scratch, m.id), ignore_errors=True)
    print()
    print("| mutation | file | result | seconds | first failing test |")
    print("| --- | --- | --- | --- | --- |")
    for row in rows:
        print(f"| {row[0]} | src/mpdiff/{row[1]} | {row[2]} | {row[3]:.1f} | {row[4]} |")
    print(f"\n{len(rows) - len(missed)} of {len(rows)} mutations caught" +
          (f"; surviving: {', '.join(missed)}" if missed else ""))
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
