"""`evaluate` metric scripts (one folder each), loadable offline with `evaluate.load(folder)`; see README.md."""
