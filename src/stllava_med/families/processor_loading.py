"""Load a checkpoint's processor on a stack without torchvision (the project's CPU torch wheel).

Why: every torchvision wheel on PyPI is CUDA-linked. With ``torch==2.13.0+cpu`` the matching
``torchvision==0.28.0`` installs but cannot be imported (``operator torchvision::nms does not exist``: its
``_C.so`` needs ``libc10_cuda``), and once it is installed ``transformers`` believes it is available, so even
``Qwen2_5_VLForConditionalGeneration`` fails to import; an unpinned ``torchvision`` pulls a newer CUDA torch
instead. So the project has no torchvision, and ``AutoProcessor.from_pretrained`` fails for processors that
carry a video processor (Qwen2-VL / Qwen2.5-VL and others): video processors are torchvision-only
(``Qwen2VLVideoProcessor requires the Torchvision library``).

What this does: ``load_processor_components`` tries ``AutoProcessor`` first; if that fails for want of
torchvision it rebuilds the processor from the checkpoint's saved parts, as ``ProcessorMixin.from_pretrained``
would: the tokenizer(s) through ``AutoTokenizer``, the image processor through
``AutoImageProcessor.from_pretrained(..., backend="pil")`` (transformers' own backend table maps the saved
``image_processor_type`` to its PIL class, e.g. ``Qwen2VLImageProcessor`` -> ``Qwen2VLImageProcessorPil``; same
config, same ``pixel_values`` / ``image_grid_thw``), the chat template from the directory, and ``None`` for
each torchvision-only component (the video processor). ``ProcessorMixin`` itself refuses ``None`` there (its
class check looks the base class up in the torchvision-gated ``VIDEO_PROCESSOR_MAPPING``) and its
``save_pretrained`` calls ``._auto_class`` on every component, so the processor is an instance of a thin
subclass of the real class (same name, so ``processor_class`` in saved configs and name-keyed lookups are
unchanged; ``isinstance`` against the real class holds) that accepts the missing component, raises a clear
error for video inputs, and writes the checkpoint's original video processor config back on save, so a
directory it saves still loads with ``AutoProcessor`` where torchvision exists.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from collections.abc import Iterator, Mapping
from typing import Any

from transformers import AutoConfig, AutoImageProcessor, AutoProcessor, AutoTokenizer, PreTrainedTokenizerBase
from transformers.dynamic_module_utils import get_class_from_dynamic_module
from transformers.models.auto.processing_auto import PROCESSOR_MAPPING, processor_class_from_name
from transformers.processing_utils import (
    MODALITY_TO_AUTOPROCESSOR_MAPPING,
    ProcessorMixin,
    _get_modality_for_attribute,
)
from transformers.utils import cached_file, is_torchvision_available

log = logging.getLogger(__name__)

# Components that may be missing without torchvision, and the legacy files their config may be in
# (the order transformers' own loader reads them in, after processor_config.json's nested entry).
OPTIONAL_WITHOUT_TORCHVISION: dict[str, tuple[str, ...]] = {
    "video_processor": ("video_preprocessor_config.json", "preprocessor_config.json"),
}

_VIDEO_UNAVAILABLE = (
    "video inputs are unavailable: this environment has no usable torchvision (transformers' video processors "
    "need it), so the processor was loaded without its video processor; images and text work as usual"
)


class TorchvisionUnavailableError(ImportError):
    """A processor component that needs torchvision was used."""


def load_processor_components(name_or_path: str, *, trust_remote_code: bool = False) -> Any:
    """The checkpoint's processor: ``AutoProcessor.from_pretrained``, or, when that fails only because
    torchvision is unavailable, the same processor class rebuilt from the saved components with the PIL image
    processor and no video processor (logged once; video inputs then raise ``TorchvisionUnavailableError``)."""
    try:
        return AutoProcessor.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except Exception as err:
        if not needs_torchvision(err):
            raise
        try:
            processor = rebuild_without_torchvision(name_or_path, trust_remote_code=trust_remote_code)
        except Exception as fallback_err:
            err.add_note(f"rebuilding the processor without torchvision failed too: {fallback_err!r}")
            raise err from None
    absent = sorted(getattr(processor, "_absent_components", {}))
    if absent:
        _log_once(f"{name_or_path}: {_VIDEO_UNAVAILABLE} (loaded {type(processor).__name__} without "
                  f"{', '.join(absent)})")
    return processor


def needs_torchvision(err: BaseException) -> bool:
    """Whether ``err`` comes from torchvision being absent or broken: an import/value/runtime error anywhere in
    its cause chain that names torchvision, or, when transformers sees no torchvision, the errors its
    torchvision-gated placeholders raise (e.g. ``VIDEO_PROCESSOR_MAPPING`` has no ``_extra_content``)."""
    for e in _chain(err):
        if isinstance(e, (ImportError, ValueError, RuntimeError)) and "torchvision" in str(e).lower():
            return True
    if is_torchvision_available():
        return False
    return any(isinstance(e, AttributeError) and "PROCESSOR_MAPPING" in str(e) for e in _chain(err))


def rebuild_without_torchvision(name_or_path: str, *, trust_remote_code: bool = False) -> Any:
    """The processor of ``name_or_path`` built component by component, as ``ProcessorMixin.from_pretrained``
    does, with the PIL image processor and ``None`` for components that need torchvision."""
    path = str(name_or_path)
    processor_dict, _ = ProcessorMixin.get_processor_dict(path)
    processor_class = _processor_class(path, processor_dict, trust_remote_code=trust_remote_code)
    args: list[Any] = []
    absent: dict[str, dict[str, Any]] = {}
    for attribute in processor_class.get_attributes():
        modality = _get_modality_for_attribute(attribute)
        primary = attribute == modality
        if modality == "tokenizer":
            sub = {} if primary else {"subfolder": attribute}
            args.append(AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code, **sub))
        elif attribute in OPTIONAL_WITHOUT_TORCHVISION:
            try:
                args.append(MODALITY_TO_AUTOPROCESSOR_MAPPING[modality].from_pretrained(
                    path, trust_remote_code=trust_remote_code))
            except Exception as err:
                if not needs_torchvision(err):
                    raise
                args.append(None)
                absent[attribute] = _saved_component_config(path, attribute, processor_dict)
        elif primary and modality == "image_processor":
            args.append(AutoImageProcessor.from_pretrained(path, backend="pil", trust_remote_code=trust_remote_code))
        elif primary:
            args.append(MODALITY_TO_AUTOPROCESSOR_MAPPING[modality].from_pretrained(
                path, trust_remote_code=trust_remote_code))
        else:  # an additional non-tokenizer component: its config is nested in processor_config.json
            config = dict(processor_dict[attribute])
            args.append(ProcessorMixin.get_possibly_dynamic_module(config[f"{modality}_type"])(**config))
    if processor_dict.get("chat_template") is None:  # older checkpoints keep it in the tokenizer config only
        tokenizer_template = getattr(_first_tokenizer(args), "chat_template", None)
        if tokenizer_template is not None:
            processor_dict["chat_template"] = tokenizer_template
    cls = without_components(processor_class, tuple(absent)) if absent else processor_class
    processor = cls.from_args_and_dict(args, processor_dict)
    if absent:
        processor._absent_components = absent
    return processor


def build_processor(processor_class: type, *, absent_configs: Mapping[str, Mapping[str, Any] | None] = (),
                    **components: Any) -> Any:
    """``processor_class(**components)`` with the components named in ``absent_configs`` left out (``None``);
    each one's config (or ``None``) is what ``save_pretrained`` writes in its place. For tiny checkpoints made
    without torchvision that must still load with ``AutoProcessor`` where torchvision exists."""
    absent = {name: dict(cfg or {}) for name, cfg in dict(absent_configs).items()}
    cls = without_components(processor_class, tuple(absent)) if absent else processor_class
    processor = cls(**{name: None for name in absent}, **components)
    if absent:
        processor._absent_components = absent
    return processor


@functools.cache
def without_components(processor_class: type, absent: tuple[str, ...]) -> type:
    """A subclass of ``processor_class`` (same name) whose ``absent`` components may be ``None``."""
    unknown = set(absent) - set(OPTIONAL_WITHOUT_TORCHVISION)
    if unknown:
        raise ValueError(f"only {sorted(OPTIONAL_WITHOUT_TORCHVISION)} may be left out, not {sorted(unknown)}")

    def check_argument_for_proper_class(self: Any, argument_name: str, argument: Any) -> Any:
        if argument is None and argument_name in absent:
            return None
        return processor_class.check_argument_for_proper_class(self, argument_name, argument)

    def _process_videos(self: Any, videos: Any, **kwargs: Any) -> Any:
        if getattr(self, "video_processor", None) is None:
            raise TorchvisionUnavailableError(_VIDEO_UNAVAILABLE)
        return processor_class._process_videos(self, videos, **kwargs)

    def save_pretrained(self: Any, save_directory: str | os.PathLike, push_to_hub: bool = False,
                        **kwargs: Any) -> Any:
        # ProcessorMixin.save_pretrained reads ``._auto_class`` of every component and nests each one's config in
        # processor_config.json: stand in the saved config for the missing component while it runs.
        configs = getattr(self, "_absent_components", {})
        missing = [name for name in absent if getattr(self, name, None) is None]
        for name in missing:
            setattr(self, name, _SavedConfig(configs.get(name) or {}))
        try:
            return processor_class.save_pretrained(self, save_directory, push_to_hub=push_to_hub, **kwargs)
        finally:
            for name in missing:
                setattr(self, name, None)

    def __reduce_ex__(self: Any, protocol: Any) -> Any:  # the class is made here: pickle it as (base, absent)
        return _restore, (processor_class, absent), self.__dict__

    return type(processor_class.__name__, (processor_class,), {
        "__module__": processor_class.__module__,
        "__qualname__": processor_class.__qualname__,
        "__doc__": f"{processor_class.__name__} without {', '.join(absent)} (torchvision unavailable).",
        "check_argument_for_proper_class": check_argument_for_proper_class,
        "_process_videos": _process_videos,
        "save_pretrained": save_pretrained,
        "__reduce_ex__": __reduce_ex__,
    })


def _restore(processor_class: type, absent: tuple[str, ...]) -> Any:
    cls = without_components(processor_class, absent)
    return cls.__new__(cls)


class _SavedConfig(dict):
    """A missing component's saved config, standing in for it while the processor is saved."""

    _auto_class = None


def _processor_class(path: str, processor_dict: Mapping[str, Any], *, trust_remote_code: bool) -> type:
    """The processor class ``AutoProcessor`` would pick: the ``processor_class`` saved in processor_config.json,
    else in the (legacy) preprocessor config or the tokenizer config, else the model config's mapping."""
    name = processor_dict.get("processor_class")
    auto_map = (processor_dict.get("auto_map") or {}).get("AutoProcessor")
    for filename in ("preprocessor_config.json", "tokenizer_config.json"):
        if name is not None or auto_map is not None:
            break
        config = _read_json(path, filename) or {}
        name = config.get("processor_class")
        auto_map = (config.get("auto_map") or {}).get("AutoProcessor")
    if auto_map is not None and trust_remote_code:
        return get_class_from_dynamic_module(auto_map, path)
    if name is not None and (cls := processor_class_from_name(name)) is not None:
        return cls
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    if type(config) in PROCESSOR_MAPPING:
        return PROCESSOR_MAPPING[type(config)]
    raise ValueError(f"{path}: no processor class found (processor_class={name!r}, model_type="
                     f"{getattr(config, 'model_type', None)!r})")


def _saved_component_config(path: str, attribute: str, processor_dict: Mapping[str, Any]) -> dict[str, Any]:
    """The missing component's config as saved: nested in processor_config.json, else its legacy file."""
    nested = processor_dict.get(attribute)
    if isinstance(nested, Mapping):
        return dict(nested)
    for filename in OPTIONAL_WITHOUT_TORCHVISION[attribute]:
        if (config := _read_json(path, filename)) is not None:
            return config
    return {}


def _read_json(path: str, filename: str) -> dict[str, Any] | None:
    resolved = cached_file(path, filename, _raise_exceptions_for_missing_entries=False,
                           _raise_exceptions_for_connection_errors=False, _raise_exceptions_for_gated_repo=False)
    if resolved is None:
        return None
    with open(resolved, encoding="utf-8") as f:
        return json.load(f)


def _first_tokenizer(args: list[Any]) -> Any:
    return next((a for a in args if isinstance(a, PreTrainedTokenizerBase)), None)


def _chain(err: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    stack = [err]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        stack.extend((e.__cause__, e.__context__))


_warned = False


def _log_once(message: str) -> None:
    """A warning the first time in a process, then info (every load is still traceable)."""
    global _warned
    log.log(logging.INFO if _warned else logging.WARNING, message)
    _warned = True
