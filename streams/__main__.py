"""Allow ``python -m streams`` as an alias of the ``edge-otlp`` console script."""

from streams.cli import main

main()
