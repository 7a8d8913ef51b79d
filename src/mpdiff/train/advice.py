"""What a run that is legal but probably not what its user wants is warned of at its start (issue 33), in
the summary of :func:`mpdiff.train.run.summary_lines`."""

from mpdiff.config import flag_for

# A run with fewer stats rows than this has no curve to show (loss, plot-dynamics); the suggested
# --status gives about SUGGESTED_ROWS.
FEW_ROWS, SUGGESTED_ROWS = 3, 8


def run_warnings(resolved):
    """What is legal but probably not what the user wants, said at the start of the run (issue 33): a run
    that ends inside the learning-rate warm-up, fewer than FEW_ROWS stats rows, `cs` skip scaling on
    config G's magnitude-preserving concatenation."""
    net, training, cadence = resolved.network, resolved.training, resolved.cadence
    duration, batch, warnings = training.duration, training.batch, []
    if training.rampup_img and duration <= training.rampup_img:
        warnings.append(f"the run ends inside the learning-rate warm-up ({flag_for('rampup_img')} "
                        f"{nimg_text(training.rampup_img)} images, {flag_for('duration')} {nimg_text(duration)}): the "
                        f"rate reaches {training.lr:.4g} only at the last step, and such a run has barely begun to "
                        f"learn; train several times longer than the warm-up, or shorten it")
    rows = -(-duration // cadence.status_nimg)  # one at every multiple, and one at the end
    if rows < FEW_ROWS:
        every = max(batch, duration // SUGGESTED_ROWS // batch * batch)
        warnings.append(f"{rows} stats row{'s' if rows != 1 else ''} in {nimg_text(duration)} images "
                        f"({flag_for('status_nimg')} {nimg_text(cadence.status_nimg)}): too "
                        f"few for loss curves or mpdiff plot-dynamics; {flag_for('status_nimg')} {nimg_text(every)} "
                        f"gives {duration // every}")
    if net.skip_scaling == "cs" and net.backbone == "unet" and net.config == "G":
        warnings.append(f"{flag_for('skip_scaling')} cs scales the long skips before config G's magnitude-preserving "
                        f"concatenation, which then no longer keeps unit magnitude (SPEC §9.6); cs-mp gives the same "
                        f"skip-to-main ratio and keeps it")
    return warnings


def nimg_text(nimg):
    """An image count as the command line writes it: 16Ki, 8Mi, or the plain number."""
    for unit, size in (("Mi", 1 << 20), ("Ki", 1 << 10)):
        if nimg >= size and nimg % size == 0:
            return f"{nimg // size}{unit}"
    return f"{nimg:,}"
