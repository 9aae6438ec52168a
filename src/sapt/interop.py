"""`python -m sapt.interop`: import of the official release's checkpoints (the command lives in sapt.tools.interop)."""

import sys

from sapt.tools.interop import main

if __name__ == "__main__":
    sys.exit(main())
