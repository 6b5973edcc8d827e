"""MAP entry point: ``python3 /opt/holoscan/app`` runs the ct-zeroshot MONAI Deploy application.

Paths come from HOLOSCAN_INPUT_PATH, HOLOSCAN_OUTPUT_PATH and HOLOSCAN_MODEL_PATH (set in the image);
flags (-i/-o/-m) override them. The application itself is ``operators.app`` from the installed package.

The same image runs the project's other deploy commands when the first argument names one:
``serve --config FILE`` (the PACS listener), ``infer ARCHIVE --out OUT`` (batch inference over a DICOM
folder), ``findings check FILE``, ``--version``.
"""

import sys

COMMANDS = {"serve", "infer", "findings", "--version"}

args = sys.argv[1:]
if args and args[0] in COMMANDS:
    from operators.cli import main as cli

    sys.exit(cli(args))

from operators.app import main  # noqa: E402

sys.exit(main(args))
