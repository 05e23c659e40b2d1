"""The Faust application, settings and process entry points."""
