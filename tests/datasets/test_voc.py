"""datasets/voc.py: the VOC palette is the dataset's standard colour map."""
import numpy as np

from datasets import voc
from tests.helpers import VOID


# VOC's colour map, as published with the dataset (background, aeroplane, bicycle, bird, boat, ..., tvmonitor)
VOC_COLOURS = {0: (0, 0, 0), 1: (128, 0, 0), 2: (0, 128, 0), 3: (128, 128, 0), 4: (0, 0, 128), 5: (128, 0, 128),
               6: (0, 128, 128), 7: (128, 128, 128), 8: (64, 0, 0), 15: (192, 128, 128), 16: (0, 64, 0),
               20: (0, 64, 128), 255: VOID}


def test_voc_palette_is_the_standard_colour_map():
    palette = voc.palette()
    assert palette.shape == (256, 3) and palette.dtype == np.uint8
    for value, colour in VOC_COLOURS.items():
        assert tuple(palette[value]) == colour, value
    palette[1] = 0  # a copy: the module's palette is unchanged
    assert tuple(voc.palette()[1]) == (128, 0, 0)
