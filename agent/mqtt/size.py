"""MQTT packet sizes: what a PUBLISH costs on the wire, and shrinking an image to fit the broker's limit.

A broker drops the connection of a client that sends a packet above its maximum packet size
(mosquitto ``max_packet_size``, AWS IoT 128 KB), so every publish of the link is checked against the
limit first (:func:`publish_packet_bytes`); images over it are shrunk (:func:`shrink_image`) or skipped.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

SHRINK_ATTEMPTS = 6
"""Down-scaling rounds before an image is given up as too large."""
MIN_SIDE_PX = 16
"""An image is not shrunk below this side length (it is skipped instead), px."""


def _varint_len(value: int) -> int:
    n = 1
    while value >= 128:
        value //= 128
        n += 1
    return n


def publish_packet_bytes(topic: str, payload_bytes: int, qos: int, *, v5: bool, property_bytes: int = 0) -> int:
    """Size on the wire of a PUBLISH packet, bytes (what a broker's maximum packet size limits).

    Args:
        topic: the topic name.
        payload_bytes: payload length, bytes.
        qos: 0, 1 or 2 (QoS > 0 adds the 2-byte packet id).
        v5: MQTT 5 (adds the property length field).
        property_bytes: MQTT 5 properties sent, bytes (a Message Expiry Interval is 5: id + 4-byte
            integer); 0 for MQTT 3.1.1.

    Returns:
        Fixed header + variable header + payload, bytes.
    """
    props = _varint_len(property_bytes) + property_bytes if v5 else 0
    remaining = 2 + len(topic.encode("utf-8")) + (2 if qos else 0) + props + payload_bytes
    return 1 + _varint_len(remaining) + remaining


def shrink_image(data: bytes, kind: str, max_payload_bytes: int) -> bytes | None:
    """Down-scale an encoded mask (PNG) or overlay (JPEG) until it fits in ``max_payload_bytes``.

    Args:
        data: the encoded image.
        kind: ``mask`` (PNG, nearest-neighbour scaling keeps it binary) or ``overlay`` (JPEG, quality 80).
        max_payload_bytes: the largest payload allowed, bytes.

    Returns:
        The re-encoded smaller image, or None when it cannot be made small enough (or not decoded).
    """
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if image is None or max_payload_bytes <= 0:
        return None
    size = len(data)
    for _ in range(SHRINK_ATTEMPTS):
        scale = min(0.9, 0.9 * math.sqrt(max_payload_bytes / size))
        height, width = image.shape[:2]
        new_w, new_h = int(width * scale), int(height * scale)
        if min(new_w, new_h) < MIN_SIDE_PX:
            return None
        interpolation = cv2.INTER_NEAREST if kind == "mask" else cv2.INTER_AREA
        image = cv2.resize(image, (new_w, new_h), interpolation=interpolation)
        if kind == "mask":
            ok, buffer = cv2.imencode(".png", image, [cv2.IMWRITE_PNG_COMPRESSION, 9])
        else:
            ok, buffer = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 80])
        if not ok:
            return None
        size = len(buffer)
        if size <= max_payload_bytes:
            return bytes(buffer.tobytes())
    return None
