"""OpenAI's Images API: `POST /v1/images/generations`, `POST /v1/images/edits`, `GET /v1/models`, and the files
behind `response_format="url"`. The official `openai` client works with `base_url="http://HOST:PORT/v1"`; diffrt's
own parameters (negative_prompt, seed, steps, guidance_scale, scheduler, strength) come as extra body fields."""
from __future__ import annotations

import base64
import io
import time
from typing import Any

from fastapi import APIRouter, Depends, Request, Response, UploadFile
from fastapi.responses import FileResponse
from PIL import Image

from diffrt.runtime.generation import seeds_for
from diffrt.runtime.image_files import read_image
from diffrt.serve.jobs import REPLICA_HEADER, GenerationRequest, GenerationResult, ServeError
from diffrt.serve.limits import bad, check_upload, parse_size
from diffrt.serve.schemas import ImageGenerationRequest
from diffrt.serve.state import ServerState, generate, server

router = APIRouter()
FILES_ROUTE = "/v1/images/files"
NAMES = {"width": "size", "height": "size", "steps": "steps", "images": "n", "prompt": "prompt",
         "negative_prompt": "negative_prompt", "guidance": "guidance_scale", "scheduler": "scheduler",
         "strength": "strength"}
RESPONSE_FORMATS = ("url", "b64_json")
EDIT_FIELDS = {"n": int, "seed": int, "steps": int, "guidance_scale": float, "strength": float}


@router.get("/v1/models")
async def list_models(state: ServerState = Depends(server)) -> dict[str, Any]:
    return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "diffrt"}
                                       for name in state.infos]}


@router.post("/v1/images/generations")
async def generations(body: ImageGenerationRequest, request: Request, response: Response,
                      state: ServerState = Depends(server)) -> dict[str, Any]:
    info = state.package(body.model, "model")
    width, height = parse_size(body.size) if body.size else (info.default_size, info.default_size)
    job = GenerationRequest(
        package=info.name, prompts=[body.prompt] * max(body.n, 0), negative_prompts=[body.negative_prompt or ""] *
        max(body.n, 0), seeds=_seeds(body.seed, body.n), width=width, height=height,
        steps=body.steps if body.steps is not None else info.default_steps,
        guidance=body.guidance_scale if body.guidance_scale is not None else info.default_guidance,
        scheduler=body.scheduler)
    _check_format(body.response_format)
    result = await generate(state, job, NAMES, request)
    return _answer(state, request, response, result, body.response_format)


@router.post("/v1/images/edits")
async def edits(request: Request, response: Response, state: ServerState = Depends(server)) -> dict[str, Any]:
    """Multipart: `image` (or `image[]`, the first is used), optional `mask` (OpenAI's convention: transparent
    pixels are repainted; a mask without alpha: white is repainted), `prompt`, `model`, `n`, `size`, ..."""
    form = await request.form(max_part_size=state.config.max_upload_bytes + 1)
    fields = {key: value for key, value in form.items() if isinstance(value, str)}
    if "prompt" not in fields:
        raise bad("prompt", "is required")
    info = state.package(fields.get("model"), "model")
    numbers = {key: _number(fields, key, kind) for key, kind in EDIT_FIELDS.items()}
    image_file = form.get("image") or form.get("image[]")
    if not isinstance(image_file, UploadFile):
        raise bad("image", "is required: the image to edit, as a file")
    image = await _upload(image_file, "image", state, "RGB")
    mask_file = form.get("mask")
    mask = _openai_mask(await _upload(mask_file, "mask", state, None)) if isinstance(mask_file, UploadFile) else None
    if fields.get("size"):
        image = image.resize(parse_size(fields["size"]), Image.Resampling.LANCZOS)
    if mask is not None:
        mask = mask.resize(image.size, Image.Resampling.NEAREST)
    n = int(numbers["n"] if numbers["n"] is not None else 1)
    response_format = fields.get("response_format", "url")
    _check_format(response_format)
    job = GenerationRequest(
        package=info.name, prompts=[fields["prompt"]] * max(n, 0),
        negative_prompts=[fields.get("negative_prompt", "")] * max(n, 0), seeds=_seeds(numbers["seed"], n),
        width=image.width, height=image.height,
        steps=int(numbers["steps"] if numbers["steps"] is not None else info.default_steps),
        guidance=float(numbers["guidance_scale"] if numbers["guidance_scale"] is not None else info.default_guidance),
        scheduler=fields.get("scheduler"), image=image, mask=mask,
        strength=float(numbers["strength"] if numbers["strength"] is not None else 1.0 if mask is not None else 0.8))
    result = await generate(state, job, NAMES, request)
    return _answer(state, request, response, result, response_format)


@router.get(FILES_ROUTE + "/{name}")
async def image_file(name: str, request: Request) -> FileResponse:
    """An image answered as `url`. Not behind the API key: like OpenAI's URLs, the name itself is the secret."""
    state: ServerState = request.app.state.server
    return FileResponse(state.outputs.find(name), media_type="image/png")


# ----- helpers -----
def _seeds(seed: int | None, n: int) -> list[int]:
    if n < 1:
        return []  # the limit check names `n`
    try:
        return seeds_for(seed, n)
    except ValueError as error:
        raise bad("seed", str(error).partition("` ")[2] or str(error)) from None


def _check_format(response_format: str) -> None:
    if response_format not in RESPONSE_FORMATS:
        raise bad("response_format", f"must be one of {', '.join(RESPONSE_FORMATS)}; got {response_format!r}")


def _number(fields: dict[str, str], key: str, kind: type) -> float | int | None:
    if key not in fields or fields[key] == "":
        return None
    try:
        value = kind(fields[key])
    except ValueError:
        raise ServeError(422, f"`{key}` must be {'an integer' if kind is int else 'a number'}; got {fields[key]!r}",
                         param=key, code="invalid_type") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise ServeError(422, f"`{key}` must be a finite number; got {fields[key]!r}", param=key, code="invalid_type")
    return value


async def _upload(upload: UploadFile, param: str, state: ServerState, mode: str | None) -> Image.Image:
    data = await upload.read(state.config.max_upload_bytes + 1)
    check_upload(data, param, state.config)
    image = read_image(io.BytesIO(data), f"`{param}`", mode or "RGBA")
    return image


def _openai_mask(mask: Image.Image) -> Image.Image:
    """Diffusers' mask (white = repaint) from OpenAI's (alpha 0 = repaint); a mask without transparency is taken
    as Diffusers' own convention already."""
    alpha = mask.getchannel("A")
    if alpha.getextrema() != (255, 255):
        return alpha.point(lambda value: 255 if value == 0 else 0)
    return mask.convert("L")


def _answer(state: ServerState, request: Request, response: Response, result: GenerationResult,
            response_format: str) -> dict[str, Any]:
    response.headers[REPLICA_HEADER] = result.replica
    data: list[dict[str, Any]] = []
    for png, infotext in zip(result.pngs, result.infotexts):
        if response_format == "b64_json":
            data.append({"b64_json": base64.b64encode(png).decode("ascii"), "revised_prompt": None})
        else:
            url = str(request.url_for("image_file", name=state.outputs.save(png)))
            data.append({"url": url, "revised_prompt": None})
    return {"created": int(time.time()), "data": data}
