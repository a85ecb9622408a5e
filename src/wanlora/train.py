"""``python -m wanlora.train`` / ``accelerate launch -m wanlora.train``: the training command.

The command lives in :mod:`wanlora.commands.train`; this module keeps the launch form users type.
"""

import sys

from wanlora.commands.train import main

if __name__ == "__main__":
    sys.exit(main())
