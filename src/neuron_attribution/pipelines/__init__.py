"""The tasks: attribute, score chosen neurons, evaluate, filter, run a dataset, analyze a run."""
