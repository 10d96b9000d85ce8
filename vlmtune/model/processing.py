"""Load a family's processor, with or without torchvision.

transformers 5 processors of several families declare a video processor, and every video
processor needs torchvision, which some machines cannot install. A subclass whose ``__init__``
has no ``video_processor`` parameter makes ProcessorMixin skip it; image-only use then works
(FACTS.md). vlmtune trains on images, so that is all it needs.
"""

from __future__ import annotations

import inspect
from functools import cache
from pathlib import Path
from typing import Any

from vlmtune.errors import ModelError
from vlmtune.model.families import Family


def without_video_processor(base: type) -> type:
    """``base`` minus its video processor; saved folders still name ``base``.

    The subclass's ``__init__`` takes exactly the base's parameters minus ``video_processor``:
    ProcessorMixin reads them from the code object to decide what processor_config.json saves
    and which of its keys reach ``__init__`` on reload (num_image_tokens, image_seq_length,
    image_seq_len...). A narrower ``(image_processor, tokenizer, chat_template, **kwargs)`` would
    drop them silently and reload with the base's defaults.
    """
    signature = inspect.signature(base.__init__)
    names = [
        p.name
        for p in list(signature.parameters.values())[1:]
        if p.kind is p.POSITIONAL_OR_KEYWORD and p.name != "video_processor"
    ]
    defaults = {
        p.name: None if p.default is p.empty else p.default
        for p in signature.parameters.values()
        if p.name in names
    }
    source = (
        f"def __init__(self, {''.join(f'{n}=_defaults[{n!r}], ' for n in names)}**kwargs):\n"
        "    kwargs.pop('video_processor', None)\n"
        f"    _base.__init__(self, {''.join(f'{n}={n}, ' for n in names)}video_processor=None, **kwargs)\n"
    )
    namespace: dict[str, Any] = {"_defaults": defaults, "_base": base}
    exec(source, namespace)  # noqa: S102 - names come from the base class's own signature
    # Bases that hand video_processor to ProcessorMixin by keyword (Gemma 4) get a class between them and
    # ProcessorMixin in the MRO that drops it; positional passing (Qwen) is dropped by ProcessorMixin itself.
    no_video = type(
        base.__name__,
        (base, _drops_video_keyword()),
        {"__init__": namespace["__init__"], "__module__": base.__module__},
    )
    no_video.__qualname__ = base.__qualname__
    return no_video


@cache
def _drops_video_keyword() -> type:
    from transformers import ProcessorMixin

    def __init__(self, *args, **kwargs):
        kwargs.pop("video_processor", None)
        ProcessorMixin.__init__(self, *args, **kwargs)

    return type("DropsVideoKeyword", (ProcessorMixin,), {"__init__": __init__})


def processor_class(family: Family) -> type | None:
    """The class to build the family's processor with on this machine (None: use AutoProcessor)."""
    if family.processor_class is None:
        return None
    import transformers
    from transformers.utils import is_torchvision_available

    if family.prepare_processor_import is not None:
        family.prepare_processor_import()
    base = getattr(transformers, family.processor_class)
    if is_torchvision_available() or not family.processor_needs_video:
        return base
    return without_video_processor(base)


def image_only_processor_class(family: Family) -> type:
    """The class to build a new processor from its parts: the image processor and tokenizer only.

    With torchvision installed the base class demands a video processor too; a processor built
    for training on images (the tiny models) has none, whatever the machine.
    """
    cls = processor_class(family)
    if cls is None:
        raise ModelError(f"{family.name} has no processor class to build from parts")
    if family.processor_needs_video and _declares_video(cls):
        return without_video_processor(cls)
    return cls


def _declares_video(cls: type) -> bool:
    return "video_processor" in inspect.signature(cls.__init__).parameters


def _from_pretrained(cls: type, family: Family, path: str | Path, **hub: Any) -> Any:
    """``cls.from_pretrained``; a folder saved without a video processor (an image-only one,
    e.g. a tiny model) still loads where torchvision makes the base class demand one."""
    try:
        return cls.from_pretrained(path, **hub)
    except (TypeError, ValueError, OSError):
        if not (family.processor_needs_video and _declares_video(cls)):
            raise
        return without_video_processor(cls).from_pretrained(path, **hub)


def load_processor(path: str | Path, family: Family, max_image_pixels: int | None = None, **hub: Any) -> Any:
    """The processor for ``path`` with the recipe's pixel budget applied."""
    try:
        cls = processor_class(family)
        if cls is None:
            from transformers import AutoProcessor

            processor = AutoProcessor.from_pretrained(path, **hub)
        else:
            processor = _from_pretrained(cls, family, path, **hub)
    except OSError as exc:
        raise ModelError(
            f"cannot load the processor of {path}: {exc}",
            hint="the folder needs the tokenizer and preprocessor files of the checkpoint; "
            "download it completely or pass a hub id",
        ) from exc
    if getattr(processor, "chat_template", None) is None and family.chat_template is not None:
        processor.chat_template = family.chat_template
    if max_image_pixels is not None and family.pixel_budget is not None:
        family.pixel_budget(processor.image_processor, max_image_pixels)
    return processor


def save_processor(processor: Any, out_dir: str | Path) -> None:
    """Save the processor; the NoVideo subclass keeps its base's name, so AutoProcessor loads it
    wherever torchvision is installed."""
    processor.save_pretrained(str(out_dir))
