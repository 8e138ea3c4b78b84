"""One handler per Label Studio control, in a registry.

To serve a new control type, write a module here with a class following
:class:`~backend.controls.base.ControlHandler` (which tags it serves, what it asks the model,
what it writes) and add it to ``HANDLERS``. The first handler whose ``serves`` accepts a
control gets it. The order also sets what is asked first: region labels come before region
texts, which name the object by its label.
"""

from __future__ import annotations

from backend.controls.base import ControlHandler
from backend.controls.image_choices import ImageChoices
from backend.controls.image_text import ImageText
from backend.controls.region_labels import RegionLabels
from backend.controls.region_text import RegionText

HANDLERS: tuple[type[ControlHandler], ...] = (RegionLabels, RegionText, ImageChoices, ImageText)

__all__ = ["HANDLERS", "ControlHandler", "ImageChoices", "ImageText", "RegionLabels", "RegionText"]
