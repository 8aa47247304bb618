"""``python -m launch.checkpoint convert FILE [--out OUT]``: the command line of
:mod:`launch.store.convert` (checkpoints themselves: :mod:`launch.store.checkpoint`)."""

import sys

from launch.store.convert import main

if __name__ == "__main__":
    sys.exit(main())
