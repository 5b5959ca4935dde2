"""`python -m mlx_fused_lora`: the same commands as the `mlx-fused-lora` console script."""

import sys

from .cli import main

sys.exit(main())
