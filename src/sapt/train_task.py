"""`python -m sapt.train_task`: one task of a sequence (the command lives in sapt.training.train_task)."""

from sapt.training.train_task import cli

if __name__ == "__main__":
    cli()
