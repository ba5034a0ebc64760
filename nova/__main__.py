"""`python -m nova ...` is the `nova` command; torchrun starts it so: `torchrun --nproc-per-node N -m nova train ...`."""

import sys

from nova.cli import main

sys.exit(main())
