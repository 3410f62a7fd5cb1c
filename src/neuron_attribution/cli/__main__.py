"""`python -m neuron_attribution.cli`."""

from . import main

main()
