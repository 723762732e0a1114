"""The A1111 ControlNet extension's API arguments (`alwayson_scripts.controlnet.args`, a list of units) as a
diffrt ControlNet call, where they map cleanly:

- `model`: a ControlNet of the package, by its name (`pose`), component name (`controlnet_pose`) or A1111 title
  (`pose [hash]`); `image` (or `input_image`): the base64 control image, already preprocessed;
- `module`: "none" only (diffrt runs no annotator: send the pose / depth / edge map itself);
- `weight` -> controlnet_conditioning_scale, `guidance_start` / `guidance_end` -> control_guidance_start / _end;
- `control_mode`: "Balanced" (0) or "ControlNet is more important" (2, Diffusers' guess mode), the same for every
  unit; "My prompt is more important" (1) has no Diffusers equivalent and is refused.
Units with `enabled: false` are skipped. Anything else about a unit (resize_mode, processor_res, thresholds,
pixel_perfect) belongs to the annotator or the UI and is ignored.
"""
from __future__ import annotations

from typing import Any, Callable

from PIL import Image

from diffrt.package.names import CONTROLNET_PREFIX
from diffrt.serve.limits import bad

CONTROL_MODES = {0: False, "balanced": False, 2: True, "controlnet is more important": True}
NO_PROMPT_MODE = (1, "my prompt is more important")


def controlnet_units(scripts: dict[str, Any], available: list[str],
                     decode: Callable[[str, str], Image.Image]) -> dict[str, Any] | None:
    """The ControlNet call arguments of `alwayson_scripts` (None without enabled units); ServeError 400 naming the
    field for what does not map. `decode(base64, param)` reads an image upload."""
    script = next((value for key, value in scripts.items() if key.lower() == "controlnet"), None)
    if not script:
        return None
    units = script.get("args") if isinstance(script, dict) else None
    if not isinstance(units, list) or not all(isinstance(unit, dict) for unit in units):
        raise bad("alwayson_scripts.controlnet.args", "must be a list of ControlNet units (objects)")
    call: dict[str, Any] = {"names": [], "images": [], "scales": [], "starts": [], "ends": [], "modes": []}
    for i, unit in enumerate(units):
        if not unit.get("enabled", True):
            continue
        param = f"alwayson_scripts.controlnet.args[{i}]"
        _unit(unit, param, available, decode, call)
    if not call["names"]:
        return None
    if len(set(call["modes"])) > 1:
        raise bad("alwayson_scripts.controlnet.args", "must all have the same control_mode here (Diffusers' "
                  "guess mode is one setting per call)")
    call["guess_mode"] = call.pop("modes")[0]
    return call


def _unit(unit: dict[str, Any], param: str, available: list[str], decode: Callable[[str, str], Image.Image],
          call: dict[str, Any]) -> None:
    module = unit.get("module") or "none"
    if str(module).lower() != "none":
        raise bad(f"{param}.module", f"must be 'none': diffrt runs no ControlNet preprocessor (send the "
                  f"preprocessed map as the image); got {module!r}")
    call["names"].append(_model(unit.get("model"), f"{param}.model", available))
    image = unit.get("image") or unit.get("input_image")
    if isinstance(image, dict):  # the extension also takes {"image": ..., "mask": ...}
        image = image.get("image")
    if not isinstance(image, str) or not image:
        raise bad(f"{param}.image", "must be a base64 control image")
    call["images"].append(decode(image, f"{param}.image"))
    for key, target in (("weight", "scales"), ("guidance_start", "starts"), ("guidance_end", "ends")):
        default = {"weight": 1.0, "guidance_start": 0.0, "guidance_end": 1.0}[key]
        value = unit.get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad(f"{param}.{key}", f"must be a number; got {value!r}")
        call[target].append(float(value))
    mode = unit.get("control_mode", 0)
    mode = mode.lower() if isinstance(mode, str) else mode
    if mode in NO_PROMPT_MODE:
        raise bad(f"{param}.control_mode", "must be 'Balanced' or 'ControlNet is more important' (guess mode): "
                  "'My prompt is more important' has no Diffusers equivalent")
    if mode not in CONTROL_MODES:
        raise bad(f"{param}.control_mode", f"must be 0 / 'Balanced' or 2 / 'ControlNet is more important'; "
                  f"got {mode!r}")
    call["modes"].append(CONTROL_MODES[mode])


def _model(model: Any, param: str, available: list[str]) -> str:
    if not isinstance(model, str) or not model:
        raise bad(param, f"must name one of this package's ControlNets: {', '.join(available) or 'none'}")
    name = model.split(" [")[0].strip()
    name = name[len(CONTROLNET_PREFIX):] if name.startswith(CONTROLNET_PREFIX) else name
    if name not in available:
        raise bad(param, f"must name one of this package's ControlNets ({', '.join(available) or 'none'}); got "
                  f"{model!r}")
    return name
