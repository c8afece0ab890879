import sys

from pydm.cli import main

sys.exit(main())
