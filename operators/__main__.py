"""``python -m operators -i IN -o OUT -m MODELS``: the MONAI Deploy application (see operators/app.py)."""

import sys

from .app import main

sys.exit(main())
