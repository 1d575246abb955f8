"""`python -m modelmap.cli`: the `modelmap` command."""

from ._app import app

app(prog_name="modelmap")
