"""Training one task of a sequence: its arguments and plan, pre-flight checks, data, the Trainer and its
pickle-free resume, prediction, release-exact mode. Entry point: ``python -m sapt train_task``."""
