"""``python -m castore``: the same command line as ``castore``."""

from castore.cli import main

main()
