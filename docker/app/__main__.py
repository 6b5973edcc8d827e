"""MAP entry point: ``python3 /opt/holoscan/app`` runs the ct-zeroshot MONAI Deploy application.

Paths come from HOLOSCAN_INPUT_PATH, HOLOSCAN_OUTPUT_PATH and HOLOSCAN_MODEL_PATH (set in the image);
flags (-i/-o/-m) override them. The application itself is ``operators.app`` from the installed package.
"""

import sys

from operators.app import main

sys.exit(main(sys.argv[1:]))
