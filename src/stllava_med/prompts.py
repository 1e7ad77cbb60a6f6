"""The prompts each stage renders with: system texts by preset name, and the generation instructions.

A stage's ``prompts.*`` keys (:mod:`stllava_med.schema`: ``StagePrompts``, ``GeneratePrompts``) take a preset
name or a text of one's own; null falls back to ``backbone.chat.system_prompt`` (which takes the same values).
The presets are the system texts of the official code's conversation templates (STLLaVA-Med / SQ-LLaVA
``llava/conversation.py``), which it uses stage by stage:

=============  ==========================  ==================================================================
preset         official template           used there for
=============  ==========================  ==================================================================
``v1_sq``      ``conv_vicuna_v1_sq``       stage-1 training (``--version v1_sq``), question generation
                                           (``llava/eval/visual_sq.py``: describe, then ``VUSER:``)
``llava_v1``   ``conv_llava_v1``           answer sampling (``model_collectA.py``) and evaluation
``v1``         ``conv_vicuna_v1``          DPO training (``dpo_finetune.sh``: ``--version v1``)
``none``       —                           no system message (a template with a built-in default, such as a
                                           converted checkpoint's, still writes its own)
=============  ==========================  ==================================================================

The texts are copied character for character: ``v1_sq`` is the Vicuna v1 text followed by the questioner
sentence with **no space** between "questions." and "Also," (the official string literals are concatenated
without one). The official templates render ``{system} USER: <image>\\n{q} ASSISTANT: {a}</s>`` (SeparatorStyle.TWO,
sep ``" "``, sep2 ``"</s>"``); how our renderer reaches that exact string is the template's business
(docs/deviations.md: a converted checkpoint's own template is the official one; llava-hf's differs by spaces).
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping

_VICUNA_V1 = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
              "detailed, and polite answers to the user's questions.")
_SQ_SENTENCE = ("Also, the artificial intelligence assistant is a curious virtual user. The virtual user asks complex "
                "questions that are relevant to the content in the image, for example, asking about background "
                "knowledge of the objects in the image, asking to discuss about events happening in the image, etc. "
                "Again, do not ask about uncertain details.")
_LLAVA_V1 = ("A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
             "detailed, and polite answers to the human's questions.")

# preset name -> system text (None: no system message)
SYSTEM_PRESETS: Mapping[str, str | None] = {
    "v1_sq": _VICUNA_V1 + _SQ_SENTENCE,   # no space: as the official string literals concatenate
    "llava_v1": _LLAVA_V1,
    "v1": _VICUNA_V1,
    "none": None,
}


def system_text(value: str | None, where: str = "prompts.system") -> str | None:
    """The system text ``value`` names: a preset's text, ``value`` itself when it is a text of one's own, or None
    (no system message) for null / ``none`` / "". A word that is no preset (``v1-sq``) is refused with the
    nearest preset, since a system text of one's own has at least one space."""
    if value is None:
        return None
    value = str(value)
    if value in SYSTEM_PRESETS:
        return SYSTEM_PRESETS[value]
    if not value.strip():
        return None
    if not any(ch.isspace() for ch in value.strip()):
        near = difflib.get_close_matches(value, list(SYSTEM_PRESETS), n=1, cutoff=0.0)
        raise ValueError(f"{where}={value!r} is no system-prompt preset (one of {sorted(SYSTEM_PRESETS)}"
                         + (f"; did you mean {near[0]!r}?" if near else "") + "); a system text of your own "
                         "needs at least one space")
    return value


def with_system(fmt: object, value: str | None, where: str = "prompts.system") -> object:
    """``fmt`` (a :class:`stllava_med.chat.ChatFormat`) with its system text replaced by ``value``'s; null
    ``value`` keeps ``fmt``'s own (``backbone.chat.system_prompt``)."""
    import dataclasses

    if value is None:
        return fmt
    return dataclasses.replace(fmt, system_prompt=system_text(value, where))  # type: ignore[type-var]
