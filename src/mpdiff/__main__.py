"""`python -m mpdiff` runs the command line."""

from mpdiff.cli import main

main()
