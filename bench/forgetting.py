"""Forgetting benchmark from a checkout: the same as ``lora-triton forgetting``.

    python bench/forgetting.py [--quick] [--out-dir DIR] [--seeds N]

The code lives in the package (``lora_triton/bench/forgetting.py``).
"""

import sys

from lora_triton.bench.forgetting import main

if __name__ == "__main__":
    sys.exit(main())
