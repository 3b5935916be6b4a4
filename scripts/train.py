#!/usr/bin/env python
"""Fine-tune with a recipe, anchored: the accelerate entry point (``anchor train`` runs the same without it).

    accelerate launch --config_file configs/single_process.yaml scripts/train.py --config recipes/sft-lora.yaml
    python scripts/train.py --config recipes/quickstart.yaml --max_steps 10 --compare

Any field of the recipe can be overridden as ``--field value``; see docs/recipes.md and anchor/train.py.
"""

import sys

from anchor.train import main

if __name__ == "__main__":
    sys.exit(main())
