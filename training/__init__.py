"""ct-zeroshot training side: synthetic corpus, data, (later) models, losses, samplers, evaluation, export.

May import ``operators`` (it reuses the one preprocessing definition); never the reverse.
"""
