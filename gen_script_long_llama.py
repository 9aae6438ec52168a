"""Write the long / llama experiment of the SAPT paper as a shell pipeline (see README).

    python gen_script_long_llama.py --help
    python gen_script_long_llama.py --quick        # tiny local model, three tasks, CPU
"""

import sys

from sapt.experiments.pipeline import main

if __name__ == "__main__":
    sys.exit(main("long_llama"))
