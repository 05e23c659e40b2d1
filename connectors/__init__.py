"""The edges of the pipeline: the only code that opens sockets."""
