"""`python -m sapt.run_lock LOCK_FILE... -- COMMAND...`: COMMAND holding its runs' locks (the command lives in
sapt.utils.run_lock)."""

import sys

from sapt.utils.run_lock import main

if __name__ == "__main__":
    sys.exit(main())
