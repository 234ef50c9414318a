"""``python -m anomaly``: the ``anomaly`` command, e.g. ``torchrun --nproc-per-node 2 -m anomaly train ...``."""
from __future__ import annotations

import sys

from anomaly.cli import main

if __name__ == "__main__":
    sys.exit(main())
