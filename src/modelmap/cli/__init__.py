"""The `modelmap` command line."""

from ._app import app as app, main as main
