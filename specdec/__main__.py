"""`python -m specdec` runs the command line."""

from specdec.cli import main

main()
