"""Offline tools around the method: benchmark preparation and the synthetic benchmark, pseudo-sample
generation, tiny test models, import of the official release's checkpoints, export to stock PEFT adapters."""
