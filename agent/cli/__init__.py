"""The ``agent`` command (``agent serve`` and the operator's verbs); see :mod:`agent.cli.main`."""

from agent.cli.main import main

__all__ = ["main"]
