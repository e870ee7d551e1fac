"""``python -m gfnlm`` (and ``torchrun -m gfnlm`` / ``accelerate launch -m gfnlm``): the command line."""

import sys

from gfnlm.cli import main

sys.exit(main())
