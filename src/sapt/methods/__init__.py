"""The continual-learning methods: their records (registry.py, plain data) and what each adds in code."""
