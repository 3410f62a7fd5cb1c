"""`python -m neuron_attribution`: the command-line interface."""

from .cli import main

main()
