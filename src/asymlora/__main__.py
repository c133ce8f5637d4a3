"""``python -m asymlora``: the asymlora command, also as ``torchrun ... -m asymlora train ...``."""

import sys

from asymlora.cli import main

if __name__ == "__main__":
    sys.exit(main())
