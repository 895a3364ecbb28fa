"""`python -m patchbay_cli`: the same as the `patchbay` console script."""

from patchbay_cli import app

app()
