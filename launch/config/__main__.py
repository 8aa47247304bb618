"""``python -m launch.config``: the key reference (Markdown) on stdout; ``python -m launch.config --update
FILE`` rewrites the generated part of FILE (docs/LAUNCHER.md) from the schema."""

import sys

from launch.config.load import update_key_reference
from launch.config.schema import keys_markdown

if sys.argv[1:2] == ["--update"] and len(sys.argv) == 3:
    update_key_reference(sys.argv[2])
else:
    print(keys_markdown(), end="")
