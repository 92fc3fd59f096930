"""A written figure is a PNG that decodes, of a plausible size, with something drawn on it."""

import io

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_drawn_png(data: bytes, min_side: int = 200) -> None:
    from matplotlib import image

    assert data[:8] == PNG_SIGNATURE
    pixels = image.imread(io.BytesIO(data), format="png")
    assert min(pixels.shape[:2]) >= min_side, pixels.shape
    rgb = pixels[..., :3]
    assert rgb.std() > 0.01  # not one flat colour
    assert (rgb.min(axis=-1) < 0.5).mean() > 0.001  # some dark ink: axes, text, lines
