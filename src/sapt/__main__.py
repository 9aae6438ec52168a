"""The front door of every command: `python -m sapt COMMAND [ARGS]`, or `sapt COMMAND [ARGS]` once installed.

    python -m sapt                      # lists the commands
    python -m sapt train_task --help    # one command's options

The top-level `gen_script_*.py` and `score.py` are thin callers of the same functions.
"""

from __future__ import annotations

import importlib
import sys

# command -> (module, function, what it does). The function parses sys.argv[1:] and returns an exit code
# (or None for success).
COMMANDS = {
    "train_task": ("sapt.training.train_task", "cli", "train and test one task of a sequence"),
    "evaluate": ("sapt.experiments.evaluate", "cli", "re-test a trained task folder (routing choices, other tasks)"),
    "score": ("sapt.experiments.score", "main", "AP, F.Ra, FWT, BWT of result folders; tables and plots"),
    "generate": ("sapt.experiments.pipeline", "generate", "write a pipeline of a preset (superni_t5, long_llama, ...)"),
    "prepare_data": ("sapt.tools.prepare_data", "main", "link or copy the released benchmark and verify it"),
    "pseudo_data": ("sapt.tools.pseudo_data", "cli", "generate pseudo samples for attentive reflection"),
    "export": ("sapt.tools.export", "main", "export a trained run as PEFT adapters"),
    "interop": ("sapt.tools.interop", "main", "import or export the official release's checkpoints"),
    "tiny": ("sapt.tools.tiny", "main", "build the tiny random models the quick mode uses"),
    "backbone": ("sapt.backbone", "main", "convert a GGUF file into a HuggingFace model folder"),
    "run_lock": ("sapt.utils.run_lock", "main", "take or release the lock of a run folder"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {what}" for name, (_, _, what) in COMMANDS.items()]
    return "usage: python -m sapt COMMAND [ARGS]   (COMMAND --help for its options)\n\ncommands:\n" + "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"sapt: unknown command {name!r}; use one of {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    module, function, _ = COMMANDS[name]
    command = getattr(importlib.import_module(module), function)
    sys.argv = [f"sapt {name}", *rest]  # what the command's parser reads and shows as its name
    result = command()
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
