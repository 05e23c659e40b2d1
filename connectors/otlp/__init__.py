"""OTLP encoding (pure) and export over OTLP/HTTP."""
