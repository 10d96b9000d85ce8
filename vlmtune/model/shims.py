"""Make processors importable where transformers declares optional packages they do not need for images.

A Family names one of these as ``prepare_processor_import``; vlmtune.model.processing runs it before it
imports the processor class. Each does nothing when the missing package is installed, and each
is idempotent. Module level: standard library only (families.py imports this module).
"""

from __future__ import annotations

import importlib
import sys
import types


def pixtral_processor_without_torchvision() -> None:
    """PixtralProcessor (Pixtral, Mistral3) without torchvision.

    transformers 5.23's processing_pixtral.py imports ``get_resize_output_image_size`` from the
    torchvision-backed image_processing_pixtral.py, and the lazy package hands out a dummy class
    without torchvision. The PIL image processor module has the same function: the import is
    pointed at it for the duration of the import only, then the real class is published on the
    package so ``transformers.PixtralProcessor`` works.
    """
    import transformers
    from transformers.utils import is_torchvision_available

    if is_torchvision_available():
        return
    processing_name = "transformers.models.pixtral.processing_pixtral"
    if processing_name not in sys.modules:
        torchvision_name = "transformers.models.pixtral.image_processing_pixtral"
        pil = importlib.import_module("transformers.models.pixtral.image_processing_pil_pixtral")
        stand_in = types.ModuleType(torchvision_name)
        stand_in.get_resize_output_image_size = pil.get_resize_output_image_size  # type: ignore[attr-defined]
        sys.modules[torchvision_name] = stand_in
        try:
            importlib.import_module(processing_name)
        finally:
            del sys.modules[torchvision_name]  # later importers see the real module's ImportError
    cls = sys.modules[processing_name].PixtralProcessor
    transformers.PixtralProcessor = cls
    importlib.import_module("transformers.models.pixtral").PixtralProcessor = cls


def minicpmv4_6_image_only_processor() -> None:
    """``transformers.MiniCPMV4_6ImageOnlyProcessor``: MiniCPMV4_6Processor (MiniCPM-V 4.6) for images alone.

    Its ``__init__`` passes the video processor positionally and reads ``video_processor.slice_mode``, so
    neither leaving it out nor vlmtune.model.processing's generic image-only subclass works, and a video
    processor needs torchvision. This subclass (named as the original, so saved folders still name it) is
    built from the image processor and tokenizer alone, with the image attributes the original ``__init__``
    sets; it renders images exactly as the original, videos not at all. Published under its own name and
    used with or without torchvision, so every machine builds the same processor.
    """
    if hasattr(sys.modules.get("transformers"), "MiniCPMV4_6ImageOnlyProcessor"):
        return
    base = importlib.import_module(
        "transformers.models.minicpmv4_6.processing_minicpmv4_6"
    ).MiniCPMV4_6Processor
    # looked up after that import: transformers' lazy loading may have put a new module object in sys.modules
    import transformers
    from transformers import ProcessorMixin

    copied = ("image_token", "video_token", "image_token_id", "video_token_id", "image_start_token",
              "image_end_token", "slice_start_token", "slice_end_token", "image_id_start_token",
              "image_id_end_token")  # fmt: skip

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template, **kwargs)
        self.slice_mode = image_processor.slice_mode
        self.video_slice_mode = False
        self.default_use_image_id = image_processor.use_image_id
        self.image_token_divisor = 4 if image_processor.downsample_mode == "4x" else 16
        self.video_token_divisor = self.image_token_divisor
        for name in copied:
            setattr(self, name, getattr(tokenizer, name))

    image_only = type(base.__name__, (base,), {"__init__": __init__, "__module__": base.__module__})
    image_only.__qualname__ = base.__qualname__
    transformers.MiniCPMV4_6ImageOnlyProcessor = image_only


def llama4_image_processor_without_torchvision() -> None:
    """Llama 4's processor without torchvision: transformers 5.23's Llama4ImageProcessor is torchvision-only.

    vlmtune.model.llama4_images holds the same steps on PIL; it is registered as the "pil" backend of
    Llama4Config where torchvision is missing (where it is installed, transformers' own class serves). Saved
    folders name "Llama4ImageProcessor" (PilBackend drops the suffix), so they load with either backend.
    """
    from transformers.utils import is_torchvision_available

    if is_torchvision_available():
        return
    from transformers import AutoImageProcessor, Llama4Config

    from vlmtune.model.llama4_images import processor_class

    # the torchvision entry is a placeholder that raises: None makes AutoImageProcessor take the PIL one
    classes = {"torchvision": None, "pil": processor_class()}
    AutoImageProcessor.register(Llama4Config, image_processor_classes=classes, exist_ok=True)


def lfm2_vl_image_processor_without_torchvision() -> None:
    """LFM2-VL's processor without torchvision: transformers 5.23's Lfm2VlImageProcessor is torchvision-only.

    vlmtune.model.lfm2_images holds the same steps on PIL, registered as the "pil" backend of Lfm2VlConfig
    where torchvision is missing, as Llama 4's (llama4_image_processor_without_torchvision).
    """
    from transformers.utils import is_torchvision_available

    if is_torchvision_available():
        return
    from transformers import AutoImageProcessor, Lfm2VlConfig

    from vlmtune.model.lfm2_images import processor_class

    classes = {"torchvision": None, "pil": processor_class()}
    AutoImageProcessor.register(Lfm2VlConfig, image_processor_classes=classes, exist_ok=True)
