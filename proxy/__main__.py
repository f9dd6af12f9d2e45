"""`python -m proxy` is `cb-proxy`."""

import sys

from proxy.cli import main

sys.exit(main())
