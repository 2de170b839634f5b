"""`python -m edge` runs the thzedge CLI."""

from edge.cli import run

run()
