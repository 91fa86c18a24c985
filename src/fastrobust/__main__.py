import sys

from fastrobust.cli import main

sys.exit(main())
