"""The ``tyr`` command line: prune, runs, eval, export, store serve, demo, recipes; one module per command.

A stable interface (scripts outside the repo call it). Exit codes: 0 success; 1 the work started and failed (or
another process holds the run); 2 refused before anything ran: bad arguments, an unknown model, recipe or config
key, a value out of range, a missing or unsupported model, a bad or unusable store, a run id reused with another config.
``--json`` prints one JSON document on stdout; progress and messages go to stderr. Errors are one line;
``--debug`` adds the traceback.
"""

from .main import main

__all__ = ["main"]
