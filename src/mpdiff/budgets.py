"""Memory budgets: how much one thing built from a file (a dataset's pixels, a network's weights) may
take, read from the environment or from the machine. Checked from headers and shapes before anything
is allocated. Bottom layer: imports nothing of mpdiff but its errors."""

import os

from mpdiff.errors import MpdiffError, printable


def physical_memory():
    """Bytes of physical memory, or None when the system cannot tell."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None
    return total if total > 0 else None


def memory_limit(env_var, error=MpdiffError):
    """(bytes or None, where it comes from): $env_var when set, else half of physical memory.

    The budget for one thing built from a file (a dataset's pixels, a network's weights): checked
    from headers and shapes before anything is allocated."""
    text = os.environ.get(env_var)
    if text is not None and text.strip():
        try:
            limit = int(text.strip().replace("_", ""))
        except ValueError:
            limit = -1
        if limit < 0:
            raise error(f"{env_var}: expected a whole number of bytes, got '{printable(text[:40])}'")
        return limit, f"set by {env_var}"
    physical = physical_memory()
    if physical is None:
        return None, "unknown"
    return physical // 2, f"half of this machine's {physical / 2 ** 30:.1f} GiB of memory; set {env_var} to change it"
