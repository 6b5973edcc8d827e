"""ct-zeroshot training side: synthetic corpus, data, models, losses, samplers, loops, evaluation, export.

May import ``operators`` (it reuses the one preprocessing definition); never the reverse.
"""

import warnings

# ``import monai`` imports MONAI Deploy and with it Holoscan, which warns about the stack size that
# its application threads need. The training side runs no Holoscan graph (``python -m operators``
# does, and the Makefile and the image raise the limit for it), so the warning is noise here.
warnings.filterwarnings("ignore", message="Current stack size", category=RuntimeWarning)
