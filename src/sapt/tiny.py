"""`python -m sapt.tiny`: tiny local models (the command lives in sapt.tools.tiny)."""

from sapt.tools.tiny import main

if __name__ == "__main__":
    main()
