"""Subcommands of `pretrain` beyond prepare and train, one module each: `add_parser(sub)` adds
its arguments, `run(args) -> exit code` does the work (errors print and return 2)."""

from __future__ import annotations

from pretrain.commands import checkpoint, export, generate, import_hf, plan, report, sweep

COMMANDS = {"export": export, "import": import_hf, "generate": generate, "plan": plan,
            "sweep": sweep, "report": report, "checkpoint": checkpoint}
