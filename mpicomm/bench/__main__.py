"""``python -m mpicomm.bench`` (the same as ``python -m mpicomm bench``)."""

import sys

from . import main

sys.exit(main())
