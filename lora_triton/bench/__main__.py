"""``python -m lora_triton.bench [--quick] [--out DIR] [--budget-s S] [--what forward,layer,cpu]``."""

import sys

from .cli import main

sys.exit(main())
