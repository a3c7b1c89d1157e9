"""``python -m inflora_avalanche run | compare | presets``."""

import sys

from .run.cli import main

if __name__ == "__main__":
    sys.exit(main())
