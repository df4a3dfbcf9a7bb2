import sys

from saeforge.cli import main

sys.exit(main())
