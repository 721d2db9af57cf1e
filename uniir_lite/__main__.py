import sys

from uniir_lite.kit.cli import main

sys.exit(main())
