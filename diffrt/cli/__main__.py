"""`python -m diffrt.cli ...`, the same as the `diffrt` console script."""
import sys

from diffrt.cli import main

sys.exit(main())
