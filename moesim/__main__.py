"""``python -m moesim`` runs the command-line interface."""

from moesim.cli import main

main()
