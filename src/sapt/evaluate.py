"""`python -m sapt.evaluate`: re-evaluate a finished run with its routing replaced (the command lives in sapt.experiments.evaluate)."""

from sapt.experiments.evaluate import cli

if __name__ == "__main__":
    cli()
