"""The forward table alone (kept for old commands): ``lora-triton bench --what forward``.

    python bench/bench_forward.py [--quick] [--out DIR] [--budget-s S]    # writes DIR/forward.csv, .png

Candidates, baselines and columns: ``lora_triton/bench/forward.py``.
"""

import sys

from lora_triton.bench.cli import main

if __name__ == "__main__":
    sys.exit(main(["--what", "forward", *sys.argv[1:]]))
