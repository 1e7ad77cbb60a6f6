"""LLaVA on a Mistral text model: the LLaVA-Med v1.5 HF conversion (``[INST] ... [/INST]`` template).

Mistral's published template accepts only user and assistant roles, so this family owns a template
(``templates/llava_mistral.jinja``) that renders user and assistant turns token-identically to the published
one (tested) and adds the questioner in the template's own idiom: the model writes the next instruction,
``[INST] {question} [/INST]``, so the question and its closing ``[/INST]`` are the targets and generation
in the questioner role starts right after ``[INST]`` and stops at ``[/INST]``. Modules, batching and fast
paths are LLaVA's.
"""

import dataclasses

from stllava_med.families.llava import LLAVA

LLAVA_MISTRAL = dataclasses.replace(
    LLAVA,
    name="llava_mistral",
    description="LLaVA-Med v1.5 HF shape (LlavaForConditionalGeneration, Mistral text model, [INST] template)",
    text_model_types=("mistral",),
    template="llava_mistral.jinja",
    questioner_stop="[/INST]",
)
