"""Peak resident memory of this process.

``getrusage``'s ``ru_maxrss`` survives ``fork``/``exec``: a process started by a big parent reports the
parent's size. On Linux the ``VmHWM`` line of ``/proc/self/status`` is this process image's own high-water
mark, so it is used where available.
"""

from __future__ import annotations

import resource
from pathlib import Path


def peak_rss_mb() -> float:
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
