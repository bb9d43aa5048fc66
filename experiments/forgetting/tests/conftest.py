"""The experiment is not part of the installed package: its tests import it from ``experiments/``."""

import sys
from pathlib import Path

EXPERIMENTS = str(Path(__file__).resolve().parents[2])
if EXPERIMENTS not in sys.path:
    sys.path.insert(0, EXPERIMENTS)
