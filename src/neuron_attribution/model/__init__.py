"""The model side: loading, per-family adapters, the hooked forward pass (trace), the linearised readout,
tokenisation and interventions. Everything above reads a model only through this package."""
