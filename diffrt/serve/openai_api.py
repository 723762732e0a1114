"""OpenAI's Images API: `POST /v1/images/generations`, `POST /v1/images/edits`, `GET /v1/models`, and the files
behind `response_format="url"`. The official `openai` client works with `base_url="http://HOST:PORT/v1"`; diffrt's
own parameters (negative_prompt, seed, steps, guidance_scale, scheduler, strength, loras) come as extra body
fields; A1111's `<lora:NAME:WEIGHT>` tags in `prompt` apply LoRAs of --lora-dir as on the A1111 endpoints."""
from __future__ import annotations

import base64
import time
from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse
from PIL import Image
from pydantic import ValidationError
from starlette.datastructures import UploadFile  # what request.form() gives (FastAPI's is a subclass)

from diffrt.runtime.generation import seeds_for
from diffrt.serve.jobs import BATCH_HEADER, REPLICA_HEADER, GenerationRequest, GenerationResult
from diffrt.serve.limits import bad, check_upload, decode_upload, parse_size
from diffrt.serve.packages import PackageInfo
from diffrt.serve.schemas import ImageEditRequest, ImageGenerationRequest
from diffrt.serve.state import ServerState, apply_loras, generate, server

router = APIRouter()
FILES_ROUTE = "/v1/images/files"
NAMES = {"width": "size", "height": "size", "steps": "steps", "images": "n", "prompt": "prompt",
         "negative_prompt": "negative_prompt", "guidance": "guidance_scale", "scheduler": "scheduler",
         "strength": "strength", "deep_cache": "deep_cache_interval"}
RESPONSE_FORMATS = ("url", "b64_json")


@router.get("/v1/models")
async def list_models(state: ServerState = Depends(server)) -> dict[str, Any]:
    return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "diffrt"}
                                       for name in state.infos]}


@router.post("/v1/images/generations")
async def generations(body: ImageGenerationRequest, request: Request, response: Response,
                      state: ServerState = Depends(server)) -> dict[str, Any]:
    info = state.package(body.model, "model")
    width, height = parse_size(body.size) if body.size else (info.default_size, info.default_size)
    job = _job(body, info, width, height)
    _check_format(body.response_format)
    await apply_loras(state, job, body.prompt, body.loras)
    result = await generate(state, job, NAMES, request)
    return _answer(state, request, response, result, body.response_format)


@router.post("/v1/images/edits")
async def edits(request: Request, response: Response, state: ServerState = Depends(server)) -> dict[str, Any]:
    """Multipart: `image` (or `image[]`, the first is used), optional `mask` (OpenAI's convention: transparent
    pixels are repainted; a mask without alpha: white is repainted), `prompt`, `model`, `n`, `size`, ..."""
    form = await request.form(max_part_size=state.config.max_upload_bytes + 1)
    try:
        body = ImageEditRequest.model_validate({k: v for k, v in form.items() if isinstance(v, str)})
    except ValidationError as error:
        raise RequestValidationError(error.errors()) from None
    info = state.package(body.model, "model")
    image_file = form.get("image") or form.get("image[]")
    if not isinstance(image_file, UploadFile):
        raise bad("image", "is required: the image to edit, as a file")
    image = await _upload(image_file, "image", state, "RGB")
    mask_file = form.get("mask")
    mask = _openai_mask(await _upload(mask_file, "mask", state, "RGBA")) if isinstance(mask_file, UploadFile) else None
    if body.size:
        image = image.resize(parse_size(body.size), Image.Resampling.LANCZOS)
    if mask is not None:
        mask = mask.resize(image.size, Image.Resampling.NEAREST)
    strength = body.strength if body.strength is not None else 1.0 if mask is not None else 0.8
    job = _job(body, info, image.width, image.height, image=image, mask=mask, strength=strength)
    _check_format(body.response_format)
    await apply_loras(state, job, body.prompt, body.loras)
    result = await generate(state, job, NAMES, request)
    return _answer(state, request, response, result, body.response_format)


@router.get(FILES_ROUTE + "/{name}")
async def image_file(name: str, request: Request) -> FileResponse:
    """An image answered as `url`. Not behind the API key: like OpenAI's URLs, the name itself is the secret."""
    state: ServerState = request.app.state.server
    return FileResponse(state.outputs.find(name), media_type="image/png")


# ----- helpers -----
def _job(body: ImageGenerationRequest, info: PackageInfo, width: int, height: int, **image: Any) -> GenerationRequest:
    count = max(body.n, 0)  # the limit check names `n` when it is below 1
    try:
        seeds = seeds_for(body.seed, count) if count else []
    except ValueError as error:
        raise bad("seed", str(error).partition("` ")[2]) from None
    return GenerationRequest(
        package=info.name, prompts=[body.prompt] * count, negative_prompts=[body.negative_prompt or ""] * count,
        seeds=seeds, width=width, height=height,
        steps=body.steps if body.steps is not None else info.default_steps,
        guidance=body.guidance_scale if body.guidance_scale is not None else info.default_guidance,
        scheduler=body.scheduler, deep_cache=body.deep_cache_interval, **image)


def _check_format(response_format: str) -> None:
    if response_format not in RESPONSE_FORMATS:
        raise bad("response_format", f"must be one of {', '.join(RESPONSE_FORMATS)}; got {response_format!r}")


async def _upload(upload: UploadFile, param: str, state: ServerState, mode: str) -> Image.Image:
    data = await upload.read(state.config.max_upload_bytes + 1)
    check_upload(data, param, state.config)
    return decode_upload(data, param, mode)


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
    response.headers[BATCH_HEADER] = str(result.batch_size)
    data: list[dict[str, Any]] = []
    for png, infotext in zip(result.pngs, result.infotexts):
        if response_format == "b64_json":
            data.append({"b64_json": base64.b64encode(png).decode("ascii"), "revised_prompt": None})
        else:
            url = str(request.url_for("image_file", name=state.outputs.save(png)))
            data.append({"url": url, "revised_prompt": None})
    return {"created": int(time.time()), "data": data}
