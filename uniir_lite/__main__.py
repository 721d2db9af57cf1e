import sys

from uniir_lite.cli import main

sys.exit(main())
