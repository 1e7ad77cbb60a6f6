"""Stage 1: visual self-questioning instruction tuning (see :mod:`stllava_med.sft.module`)."""
