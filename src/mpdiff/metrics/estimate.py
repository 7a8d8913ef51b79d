"""Saying how long evaluation work will take, before most of it is done (issue 33): `mpdiff ref`,
`metrics` and, per EMA length, `ema-sweep`.

:func:`timed_batches` passes batches of images through unchanged and, once one whole batch cycle (made
by the producer: decoding, or sampling with a network; used by the consumer: the detectors) has been
timed after the first (which pays one-time costs), says how long the rest will take when that is at
least :data:`SAY_ABOVE_SECONDS`. Measured on this machine as it is loaded now, not guessed.
"""

import time

SAY_ABOVE_SECONDS = 30          # shorter work is not worth a line


def duration_text(seconds):
    """'2 h 05 min', '3 min 12 s', '45 s'."""
    minutes, seconds = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {seconds:02d} s" if minutes else f"{seconds} s"


def timed_batches(batches, total, say, what="images", min_seconds=SAY_ABOVE_SECONDS):
    """Yield the batches of `batches` (each with a len) as they come; after the second, `say` one line
    with the time the remaining `total` - done items will take at the rate of the second batch cycle."""
    done, previous, said = 0, None, False
    for batch in batches:
        now = time.perf_counter()
        if previous is not None and not said:
            said = True
            seconds = (now - previous[0]) / max(previous[1], 1) * max(total - done, 0)
            if seconds >= min_seconds:
                rate = previous[1] / max(now - previous[0], 1e-9)
                say(f"estimate  about {duration_text(seconds)} for the remaining {total - done:,} {what} "
                    f"({rate:.3g} {what}/s, measured here on a batch)")
        done += len(batch)
        previous = (now, len(batch))
        yield batch
