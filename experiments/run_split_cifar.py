#!/usr/bin/env python
"""`inflora-avalanche run` with the split_cifar100 presets as default (see --help and the README)."""

import sys

from inflora_avalanche.run.cli import run_main

if __name__ == "__main__":
    sys.exit(run_main(sys.argv[1:], benchmark="split_cifar100", prog="run_split_cifar.py"))
