#!/usr/bin/env python
"""`inflora-avalanche run` with the imagenet_r presets as default (see --help and the README)."""

import sys

from inflora_avalanche.run.cli import run_main

if __name__ == "__main__":
    sys.exit(run_main(sys.argv[1:], benchmark="imagenet_r", prog="run_imagenet_r.py"))
