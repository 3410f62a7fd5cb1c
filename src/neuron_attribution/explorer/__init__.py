"""The explorer (`neuron-attribution serve`): a local web app over one loaded model and any finished runs.

`views` computes what each page shows from the library (attributions, interventions, vocabulary projections),
`run_index` indexes runs' Parquet tables in DuckDB, `model_queue` runs model work one request at a time off the
event loop, `app` maps HTTP routes onto them, `server` starts it. The browser code in `assets/` builds every
page from JSON with DOM calls and `textContent`: nothing the model or a user wrote is parsed as markup.
"""
