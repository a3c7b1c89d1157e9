#!/usr/bin/env python
"""InfLoRA on imagenet_r with Avalanche: presets, seeds, evaluation and results files. See --help and the README."""

import sys

from inflora_avalanche.experiment import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], benchmark="imagenet_r"))
