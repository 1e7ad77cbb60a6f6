"""STLLaVA-Med: self-training large language-and-vision assistants for medical VQA.

Stages (each a Hydra entry point, ``python -m stllava_med.<stage> key=value ...``):
``train_sft`` (visual self-questioning), ``generate`` (self-questions + sampled answers), ``judge`` (expert
preferences), ``train_dpo`` (DPO against a frozen reference), ``evaluate`` / ``score`` (zero-shot medical VQA),
``pipeline`` and ``report``.
"""

__version__ = "0.1.0"
