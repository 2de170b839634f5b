"""`python -m edge` runs the thzedge CLI."""

from edge import early_stop

early_stop.install()  # before the heavy imports: a SIGTERM during them is a clean stop

from edge.cli import run  # noqa: E402

run()
