"""``starflow-trt``: the command-line entry point (click).

Verbs live in their own modules and are imported lazily, so ``starflow-trt --help``
and ``doctor`` start fast and never import TensorRT. Errors caused by user input
(:class:`~starflow_trt.errors.StarflowError`) print one line ``error: …`` and exit 2.
"""

from __future__ import annotations

import importlib
import sys
from typing import Optional

import click

from . import __version__
from .errors import StarflowError

#: verb → "module:attribute" of its click command
COMMANDS = {
    "inspect": "starflow_trt.commands.inspect_cmd:inspect_command",
    "export": "starflow_trt.commands.export_cmd:export_command",
    "generate": "starflow_trt.commands.generate_cmd:generate_command",
    "score": "starflow_trt.commands.generate_cmd:score_command",
    "calibrate": "starflow_trt.calibration.cli:calibrate_command",
    "build": "starflow_trt.engine.cli:build",
    "doctor": "starflow_trt.engine.cli:doctor",
    "demo": "starflow_trt.commands.demo_cmd:demo_command",
    "bench": "starflow_trt.commands.bench_cmd:bench_command",
    "serve": "starflow_trt.commands.serve_cmd:serve_command",
}


class LazyGroup(click.Group):
    """A group whose subcommands are imported on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> Optional[click.Command]:
        target = COMMANDS.get(name)
        if target is None:
            return None
        module, attr = target.split(":")
        try:
            return getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as exc:
            reason = str(exc)  # `exc` is unbound once the except block ends

            @click.command(name, help=f"(unavailable: {reason})")
            def unavailable() -> None:
                raise StarflowError(f"command {name!r} is not available in this installation ({reason})")
            return unavailable

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except StarflowError as exc:
            click.echo(f"error: {' '.join(str(exc).split())}", err=True)
            ctx.exit(2)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="starflow-trt")
def main() -> None:
    """STARFlow-V deployment toolchain: export → calibrate → build → generate."""


if __name__ == "__main__":
    sys.exit(main())
