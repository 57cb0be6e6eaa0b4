"""`python -m vision.triton --help` (the same as `vision triton`)."""

import sys

from vision.triton.cli import main

sys.exit(main())
