"""The domain: records that travel on topics and pure pipeline logic, no I/O."""
