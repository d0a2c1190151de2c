"""`python -m beit` runs the command line."""

from beit.cli import main

main()
