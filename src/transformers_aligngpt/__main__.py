"""`python -m transformers_aligngpt ...` is the `aligngpt` command."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
