"""Drawing detections onto images (OpenCV)."""
import cv2
import numpy as np

_PALETTE = np.array(
    [
        (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
        (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 190),
    ],
    np.uint8,
)


def draw_detections(
    image,
    boxes,
    scores,
    classes,
    *,
    normalized=True,
    class_names=None,
    score_threshold=0.3,
    thickness=1,
    font_scale=0.35,
):
    """Returns a copy of an RGB uint8 ``image`` with boxes and ``label score`` drawn.

    Args:
        image: ``[H, W, 3]`` (or ``[H, W]``) uint8 RGB.
        boxes: ``[K, 4]`` yxyx, normalized (default) or in pixels (``normalized=False``).
        scores: ``[K]``.
        classes: ``[K]`` ids (any integers; ``class_names`` maps them to text, a dict or
            a sequence indexed by id).
        score_threshold: boxes below are not drawn. Default 0.3.
    """
    canvas = np.ascontiguousarray(image if image.ndim == 3 else np.repeat(image[..., None], 3, -1)).copy()
    h, w = canvas.shape[:2]
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    if normalized:
        boxes = boxes * np.array([h, w, h, w], np.float32)
    for box, score, cls in zip(boxes, np.asarray(scores).reshape(-1), np.asarray(classes).reshape(-1)):
        if score < score_threshold or cls < 0:
            continue
        color = tuple(int(c) for c in _PALETTE[int(cls) % len(_PALETTE)])
        y0, x0, y1, x1 = [int(round(v)) for v in box]
        cv2.rectangle(canvas, (x0, y0), (x1, y1), color, thickness)
        if class_names is not None:
            try:
                name = class_names[int(cls)]
            except (KeyError, IndexError):
                name = str(int(cls))
        else:
            name = str(int(cls))
        cv2.putText(
            canvas, f"{name} {score:.2f}", (x0, max(y0 - 2, 8)), cv2.FONT_HERSHEY_SIMPLEX, font_scale, color, 1,
            cv2.LINE_AA,
        )
    return canvas


def save_image(path, image_rgb):
    """Writes an RGB uint8 image (OpenCV wants BGR)."""
    if not cv2.imwrite(str(path), cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR)):
        raise OSError(f"Could not write image {path}")
