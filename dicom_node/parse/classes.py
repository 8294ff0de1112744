"""The one place that knows the CIHP class list and the colour of each class.

The order is the model's output order (index = class id). Colours follow the LIP/CIHP
palette that human-parsing tools have used since the CIHP release, so our overlays look
like the ones clinicians may have seen in papers. Index 20, ``Human``, is the whole-person
instance class: it never appears in the label map, only as person instances.
"""

from __future__ import annotations

CLASS_NAMES: tuple[str, ...] = (
    "Background", "Hat", "Hair", "Gloves", "Sunglasses", "UpperClothes",
    "Dress", "Coat", "Socks", "Pants", "Torso-skin", "Scarf", "Skirt",
    "Face", "Left-arm", "Right-arm", "Left-leg", "Right-leg",
    "Left-shoe", "Right-shoe", "Human",
)

BACKGROUND = 0
HUMAN = 20
NUM_PART_CLASSES = 20  # 0..19: the classes a label-map pixel can take

# RGB colour per class index (LIP/CIHP palette; Human gets white for person outlines).
CLASS_COLORS: tuple[tuple[int, int, int], ...] = (
    (0, 0, 0),        # Background
    (128, 0, 0),      # Hat
    (255, 0, 0),      # Hair
    (0, 85, 0),       # Gloves
    (170, 0, 51),     # Sunglasses
    (255, 85, 0),     # UpperClothes
    (0, 0, 85),       # Dress
    (0, 119, 221),    # Coat
    (85, 85, 0),      # Socks
    (0, 85, 85),      # Pants
    (85, 51, 0),      # Torso-skin
    (52, 86, 128),    # Scarf
    (0, 128, 0),      # Skirt
    (0, 0, 255),      # Face
    (51, 170, 221),   # Left-arm
    (0, 255, 255),    # Right-arm
    (85, 255, 170),   # Left-leg
    (170, 255, 85),   # Right-leg
    (255, 255, 0),    # Left-shoe
    (255, 170, 0),    # Right-shoe
    (255, 255, 255),  # Human
)

assert len(CLASS_COLORS) == len(CLASS_NAMES)


def class_color(class_index: int) -> tuple[int, int, int]:
    """RGB colour of a class; the overlay, the legend and the SEG's CIELab value all use it."""
    return CLASS_COLORS[class_index]
