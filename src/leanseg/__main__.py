"""``python -m leanseg`` (also what ``torchrun -m leanseg`` runs)."""

import sys

from leanseg.cli import main

sys.exit(main())
