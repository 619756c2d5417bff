"""The single preprocessing function shared by training, evaluation, export callers and the agent.

Everything that feeds the model calls :func:`to_model_input`, so a frame gives the same score in
``fod eval``, through a model package and in the running agent. The exported graph does the rest
(float conversion, BGR->RGB, ImageNet normalisation) on the device.
"""

from __future__ import annotations

import io
from pathlib import Path

import cv2
import numpy as np

from fod.errors import ImageTooLarge, InputError


def as_bgr(image: np.ndarray, *, source: str = "image") -> np.ndarray:
    """Return a 3-channel BGR uint8 view of an image as OpenCV decodes it.

    Args:
        image: ``[H, W]`` grayscale, ``[H, W, 1]``, ``[H, W, 3]`` BGR or ``[H, W, 4]`` BGRA, uint8.
        source: name used in error messages (file name, camera name).

    Returns:
        ``[H, W, 3]`` uint8, BGR order.

    Raises:
        InputError: not uint8, empty, or a channel count other than 1, 3 or 4.
    """
    if not isinstance(image, np.ndarray):
        raise InputError(f"{source}: expected a numpy array, got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise InputError(
            f"{source}: expected uint8 pixels as OpenCV decodes them, got {image.dtype}; "
            "convert with cv2.convertScaleAbs or np.clip(x, 0, 255).astype(np.uint8)"
        )
    if image.size == 0 or image.ndim not in (2, 3):
        raise InputError(f"{source}: expected an [H, W] or [H, W, C] image, got shape {image.shape}")
    if image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    channels = image.shape[2]
    if channels == 1:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    if channels == 3:
        return image
    if channels == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2BGR)
    raise InputError(f"{source}: expected 1, 3 or 4 channels, got {channels} (shape {image.shape})")


def to_model_input(image: np.ndarray, size: tuple[int, int], *, source: str = "image") -> np.ndarray:
    """Convert a decoded frame to the model's input: squash-resize to ``size``, BGR uint8.

    The whole frame is resized to exactly ``size`` (no crop, aspect not kept), as the MVTec
    protocol does. ``cv2.INTER_AREA`` anti-aliases when shrinking, which stands in for the
    reference's Lanczos resize (fod-method.md section 1).

    Args:
        image: any frame accepted by :func:`as_bgr`.
        size: ``(height, width)`` of the model input in px.
        source: name used in error messages.

    Returns:
        ``[height, width, 3]`` uint8, BGR, C-contiguous.

    Raises:
        InputError: see :func:`as_bgr`.
    """
    bgr = as_bgr(image, source=source)
    height, width = size
    if bgr.shape[:2] != (height, width):
        bgr = cv2.resize(bgr, (width, height), interpolation=cv2.INTER_AREA)
    return np.ascontiguousarray(bgr)


IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"})
"""File suffixes read as images by every folder reader (training, eval, calibration, bench, agent)."""


BEYOND_PILLOW = (1 << 31, 1 << 31)
"""What :func:`header_size` returns for an image Pillow refuses to open as a decompression bomb."""


def header_size(data: bytes | np.ndarray) -> tuple[int, int] | None:
    """Width and height an encoded image announces in its header, read without decoding the pixels.

    Uses Pillow's lazy ``Image.open`` (header only), so a 10000 x 10000 px file costs a few hundred
    bytes to check instead of 300 MB to decode.

    Args:
        data: the encoded file content.

    Returns:
        ``(width, height)`` in px (before any EXIF rotation); :data:`BEYOND_PILLOW` when the image has
        more pixels than Pillow opens at all (twice ``PIL.Image.MAX_IMAGE_PIXELS``, about 179 M px);
        None when the header is not one Pillow knows (the decoder then reports the file).
    """
    from PIL import Image  # lazy: only callers that check a size pay the import

    raw = data.tobytes() if isinstance(data, np.ndarray) else bytes(data)
    try:
        with Image.open(io.BytesIO(raw)) as image:
            return int(image.size[0]), int(image.size[1])
    except Image.DecompressionBombError:
        return BEYOND_PILLOW
    except (OSError, ValueError, SyntaxError):  # UnidentifiedImageError is an OSError
        return None


def decode_image(data: bytes | np.ndarray, *, source: str = "image", max_side_px: int | None = None) -> np.ndarray:
    """Decode an encoded image (PNG, JPEG, BMP, TIFF, WebP) to BGR uint8: the one decoder of the project.

    Every path that turns a file into pixels (training, ``fod eval``, calibration, ``fod bench``, the
    agent's folder and file sources) calls this, so the same file gives the same pixels everywhere:

    * the EXIF orientation tag is applied (a phone or camera JPEG shot upright is upright);
    * 16-bit images become 8-bit (value // 256), grayscale becomes 3-channel, alpha is dropped.

    Args:
        data: the encoded file content.
        source: name used in error messages (file name).
        max_side_px: refuse an image whose header announces a wider or taller size, before any pixel
            is decoded (:func:`header_size`); None = no limit.

    Returns:
        ``[H, W, 3]`` uint8, BGR order.

    Raises:
        ImageTooLarge: a side above ``max_side_px`` (nothing was allocated for the pixels).
        InputError: empty or undecodable data (corrupt or not an image).
    """
    buffer = np.frombuffer(data, dtype=np.uint8) if isinstance(data, bytes | bytearray) else data
    if max_side_px is not None and buffer.size:
        size = header_size(buffer)
        if size is not None and max(size) > max_side_px:
            what = "more than 179 M px" if size == BEYOND_PILLOW else f"{size[0]}x{size[1]} px"
            raise ImageTooLarge(
                f"{source}: image of {what} is larger than the limit of {max_side_px} px per side "
                "(cameras.max_frame_side_px); not decoded"
            )
    try:
        image = cv2.imdecode(buffer, cv2.IMREAD_COLOR) if buffer.size else None
    except cv2.error as exc:  # OpenCV refuses images over 2^30 px (OPENCV_IO_MAX_IMAGE_PIXELS) by raising
        raise InputError(f"{source}: OpenCV cannot decode the image ({str(exc).strip().splitlines()[-1]})") from None
    if image is None:
        raise InputError(f"{source}: cannot decode the image (corrupt or not an image); replace or remove it")
    return image


def read_image(path: str, *, flags: int = cv2.IMREAD_COLOR, max_side_px: int | None = None) -> np.ndarray:
    """Read an image file with :func:`decode_image` (BGR uint8), with an error naming the file.

    Args:
        path: image file (png, jpg, bmp, tif, webp).
        flags: ``cv2.IMREAD_COLOR`` (the default: :func:`decode_image`), or ``IMREAD_GRAYSCALE`` for
            masks (EXIF orientation applied too, so a mask stays aligned with its image).
        max_side_px: see :func:`decode_image` (colour reads only).

    Returns:
        ``[H, W, 3]`` uint8 BGR (or ``[H, W]`` with ``IMREAD_GRAYSCALE``).

    Raises:
        ImageTooLarge: a side above ``max_side_px``, from the header (not decoded).
        InputError: the file is missing, unreadable or cannot be decoded.
    """
    try:
        data = np.fromfile(path, dtype=np.uint8) if Path(path).is_file() else None
    except OSError as exc:
        raise InputError(f"{path}: cannot read the file: {exc}") from exc
    if data is None:
        raise InputError(f"{path}: file not found")
    if flags == cv2.IMREAD_COLOR:
        return decode_image(data, source=path, max_side_px=max_side_px)
    try:
        image = cv2.imdecode(data, flags) if data.size else None
    except cv2.error as exc:
        raise InputError(f"{path}: OpenCV cannot decode the image ({str(exc).strip().splitlines()[-1]})") from None
    if image is None:
        raise InputError(f"{path}: cannot decode the image (corrupt or not an image); replace or remove it")
    return image


def crop_box(
    image: np.ndarray, box: tuple[int, int, int, int] | None
) -> tuple[tuple[int, int, int, int], np.ndarray] | None:
    """Crop a region of interest, clipped to the image (the one ROI crop of the agent and the demo).

    Args:
        image: ``[H, W, ...]`` frame.
        box: ``(x, y, width, height)`` in px; None = the whole frame. A box reaching past the frame
            is clipped to it.

    Returns:
        ``(clipped box, view of the image)``, or None when fewer than 2 px remain in either direction.
    """
    height, width = image.shape[:2]
    x, y, w, h = box if box is not None else (0, 0, width, height)
    x0, y0 = min(x, width), min(y, height)
    x1, y1 = min(x + w, width), min(y + h, height)
    if x1 - x0 < 2 or y1 - y0 < 2:
        return None
    return (x0, y0, x1 - x0, y1 - y0), image[y0:y1, x0:x1]
