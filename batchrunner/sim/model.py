"""The model the simulator serves: its slugs, its ``request_schema``, and the check of a create body.

``REQUEST_SCHEMA`` is what ``GET /v1/model`` answers; :func:`create_problem` enforces the same fields (and
the ``model``/``input`` envelope) on ``POST /v1/prediction``, so the two are kept side by side.
"""

from __future__ import annotations

from typing import Any, Final

__all__ = ["ASPECT_RATIOS", "MODEL_SLUGS", "MODEL_TITLES", "OUTPUT_FORMATS", "REQUEST_SCHEMA", "create_problem"]

MODEL_TITLES: Final = {"flux-kontext-max": "FLUX.1 Kontext [max]", "flux-kontext-pro": "FLUX.1 Kontext [pro]"}
MODEL_SLUGS: Final = tuple(MODEL_TITLES)
ASPECT_RATIOS: Final = (
    "match_input_image",
    *("1:1", "16:9", "9:16", "4:3", "3:4", "3:2", "2:3", "4:5", "5:4", "21:9", "9:21", "2:1", "1:2"),
)
OUTPUT_FORMATS: Final = ("png", "jpg")
REQUEST_SCHEMA: Final[dict[str, Any]] = {
    "type": "object",
    "title": "Input",
    "required": ["prompt"],
    "properties": {
        "prompt": {"type": "string", "minLength": 1, "description": "Text description of the edit to make"},
        "input_image": {
            "type": "string",
            "format": "uri",
            "description": "Image to edit (jpeg, png, gif, webp)",
        },
        "aspect_ratio": {"type": "string", "enum": list(ASPECT_RATIOS), "default": "match_input_image"},
        "seed": {"type": "integer", "description": "Random seed; omit for a new result each time"},
        "safety_tolerance": {"type": "integer", "minimum": 0, "maximum": 6, "default": 2},
        "output_format": {"type": "string", "enum": list(OUTPUT_FORMATS), "default": "png"},
    },
}


def create_problem(body: Any) -> str | None:
    """What is wrong with a create body, or None when it is acceptable."""
    if not isinstance(body, dict):
        return "Request body must be a JSON object"
    model = body.get("model")
    if not isinstance(model, str) or not model.strip():
        return "model is required"
    inputs = body.get("input")
    if inputs is None:
        return "input is required"
    if not isinstance(inputs, dict):
        return "input must be an object"
    prompt = inputs.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        return "input.prompt is required"
    image = inputs.get("input_image")
    if image is not None and not isinstance(image, str):
        return "input.input_image must be a URL string"
    aspect = inputs.get("aspect_ratio")
    if aspect is not None and aspect not in ASPECT_RATIOS:
        return f"input.aspect_ratio must be one of {', '.join(ASPECT_RATIOS)}"
    seed = inputs.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        return "input.seed must be an integer"
    tolerance = inputs.get("safety_tolerance")
    if tolerance is not None and (
        not isinstance(tolerance, int) or isinstance(tolerance, bool) or not 0 <= tolerance <= 6
    ):
        return "input.safety_tolerance must be an integer from 0 to 6"
    fmt = inputs.get("output_format")
    if fmt is not None and fmt not in OUTPUT_FORMATS:
        return "input.output_format must be png or jpg"
    return None
