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
