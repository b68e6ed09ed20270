"""`python -m forge`: the same command line as the `forge` script."""

from forge.cli import main

main(prog_name="forge")
