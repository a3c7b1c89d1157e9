#!/usr/bin/env python
"""`inflora-avalanche compare`: run InfLoRA and the baselines on one stream and tabulate (see --help)."""

import sys

from inflora_avalanche.run.compare import compare_main

if __name__ == "__main__":
    sys.exit(compare_main(sys.argv[1:]))
