"""``python -m launch.report RUN_DIR [RUN_DIR ...] [--plot [OUT.png]]``: the command line of
:mod:`launch.record.report`."""

import sys

from launch.record.report import main

if __name__ == "__main__":
    sys.exit(main())
