"""Self-contained transformers code that `ioe-train export --format hf` copies into an export
(loaded with `trust_remote_code=True`). ioe_train never imports these modules: they import
only torch and transformers, so an export runs where ioe_train is not installed."""
