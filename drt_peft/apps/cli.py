"""The ``drt-peft`` command."""

from __future__ import annotations

import argparse
import sys

from . import bench, demo, inspect_adapter


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="drt-peft", description="Dimensionality Reduced Training for transformers")
    commands = parser.add_subparsers(dest="command", required=True)
    demo.add_arguments(commands.add_parser("demo", help="fine-tune the real MiniLM on Rotten Tomatoes with DRT"))
    bench.add_arguments(commands.add_parser("bench", help="run the benchmark suites (from a source checkout)"))
    inspect_adapter.add_arguments(
        commands.add_parser("inspect", help="describe an adapter folder or Hub repo: its layers, method and base")
    )
    args = parser.parse_args(argv)
    return {"demo": demo.run, "bench": bench.run, "inspect": inspect_adapter.run}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
