"""Run the benchmark tables from a checkout: the same as ``lora-triton bench``.

    python bench/run.py [--quick] [--out DIR] [--budget-s S] [--what forward,layer,cpu] [--threads N]

The code lives in the package (``lora_triton/bench/``) so an installed lora-triton has it too.
"""

import sys

from lora_triton.bench.cli import main

if __name__ == "__main__":
    sys.exit(main())
