"""thzedge runtime: bundles, backends, inference runner, streaming daemon and the root CLI."""

__version__ = "0.1.0"
