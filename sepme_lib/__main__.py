"""``python -m sepme_lib <command>``: the command line (``cli.py``; also installed as ``sepme``)."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
