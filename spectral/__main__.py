import sys

from spectral.cli import main

sys.exit(main())
