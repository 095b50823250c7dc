"""``python -m castore``: the same command line as ``castore``."""

from castore.cli import main

if __name__ == "__main__":
    main()
