"""Research tools built on the training library: the supervised and linear probes (``probe``), the CPU
recipe end to end (``recipe``), the self-supervised image pretext (``pretrain``) and the seed paper's
sampler study (``study``)."""
