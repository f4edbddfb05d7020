import sys

from qwenrl.train.cli import main

sys.exit(main())
