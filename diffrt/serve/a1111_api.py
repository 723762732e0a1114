"""AUTOMATIC1111's API (`/sdapi/v1/...`): txt2img, img2img, samplers, schedulers, sd-models, options (whose
`sd_model_checkpoint` picks the package), progress and interrupt, loras and refresh-loras (its Lora extension's),
with A1111's field names, defaults and response shape (`images`: base64 PNGs with the infotext; `parameters`: the
request; `info`: a JSON string), so `webuiapi` and other tools written for A1111 work unchanged."""
from __future__ import annotations

import asyncio
import base64
import binascii
import json
import time
from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from PIL import Image, ImageOps

from diffrt import __version__
from diffrt.package.names import CONTROLNET_PREFIX
from diffrt.runtime.generation import seeds_for
from diffrt.schedulers import registered_names
from diffrt.schedulers.names import ALIASES, SAMPLERS
from diffrt.serve.a1111_controlnet import controlnet_units
from diffrt.serve.jobs import BATCH_HEADER, REPLICA_HEADER, GenerationRequest, GenerationResult
from diffrt.serve.limits import bad, check_upload, decode_upload
from diffrt.serve.packages import PackageInfo
from diffrt.serve.schemas import Img2ImgRequest, OptionsUpdate, Txt2ImgRequest
from diffrt.serve.state import ServerState, apply_loras, generate, server

router = APIRouter(prefix="/sdapi/v1")
NAMES = {"width": "width", "height": "height", "steps": "steps", "images": "batch_size", "prompt": "prompt",
         "negative_prompt": "negative_prompt", "guidance": "cfg_scale", "scheduler": "sampler_name",
         "strength": "denoising_strength", "deep_cache": "deep_cache_interval"}
AUTOMATIC = "automatic"
# A1111's schedule types (modules/sd_schedulers.py: name, label) that diffrt builds (diffrt.schedulers.names)
SCHEDULE_TYPES = {"automatic": "Automatic", "karras": "Karras", "exponential": "Exponential",
                  "sgm_uniform": "SGM Uniform", "simple": "Simple", "beta": "Beta"}


@router.post("/txt2img")
async def txt2img(body: Txt2ImgRequest, request: Request, response: Response,
                  state: ServerState = Depends(server)) -> dict[str, Any]:
    info = _package(state, body)
    job = _job(info, body, body.width, body.height, controlnet=_controlnet(body, info, state))
    await apply_loras(state, job, body.prompt, body.loras)
    result = await generate(state, job, NAMES, request)
    return _answer(response, info, body, job, result, body.model_dump())


@router.post("/img2img")
async def img2img(body: Img2ImgRequest, request: Request, response: Response,
                  state: ServerState = Depends(server)) -> dict[str, Any]:
    info = _package(state, body)
    if not body.init_images:
        raise bad("init_images", "needs one base64 image")
    size = (body.width, body.height)
    image = _decode(body.init_images[0], "init_images", state, "RGB").resize(size, Image.Resampling.LANCZOS)
    mask = None
    if body.mask:
        mask = _decode(body.mask, "mask", state, "L").resize(size, Image.Resampling.NEAREST)
        mask = ImageOps.invert(mask) if body.inpainting_mask_invert else mask
    job = _job(info, body, body.width, body.height, image=image, mask=mask, strength=body.denoising_strength,
               controlnet=_controlnet(body, info, state))
    await apply_loras(state, job, body.prompt, body.loras)
    result = await generate(state, job, NAMES, request)
    parameters = body.model_dump()
    if not body.include_init_images:
        parameters.update(init_images=None, mask=None)
    return _answer(response, info, body, job, result, parameters)


@router.get("/samplers")
async def samplers(state: ServerState = Depends(server)) -> list[dict[str, Any]]:
    available = set(registered_names())
    return [{"name": name, "aliases": [alias for alias, target in ALIASES.items() if target == name], "options": {}}
            for name, (class_name, _) in SAMPLERS.items() if class_name in available]


@router.get("/schedulers")
async def schedulers(state: ServerState = Depends(server)) -> list[dict[str, Any]]:
    return [{"name": name, "label": label, "aliases": None, "default_rho": -1, "need_inner_model": False}
            for name, label in SCHEDULE_TYPES.items()]


@router.get("/sd-models")
async def sd_models(state: ServerState = Depends(server)) -> list[dict[str, Any]]:
    return [{"title": info.title, "model_name": info.name, "hash": info.model_hash, "sha256": info.model_hash,
             "filename": info.name, "config": None} for info in state.infos.values()]


@router.get("/options")
async def get_options(state: ServerState = Depends(server)) -> dict[str, Any]:
    info = state.package(None, "sd_model_checkpoint")
    return {**state.options, "sd_model_checkpoint": info.title, "sd_checkpoint_hash": info.model_hash}


@router.post("/options")
async def set_options(body: OptionsUpdate, state: ServerState = Depends(server)) -> None:
    """`sd_model_checkpoint` (a served package's name or title) becomes the package of later `/sdapi/` requests;
    other options are kept and shown, with no effect (A1111 has hundreds)."""
    if body.sd_model_checkpoint is not None:
        state.current_model = state.package(body.sd_model_checkpoint, "sd_model_checkpoint").name
    state.options.update({k: v for k, v in (body.model_extra or {}).items()})
    return None


@router.get("/progress")
async def progress(state: ServerState = Depends(server)) -> dict[str, Any]:
    now = await state.backend.progress()
    steps = now["steps"]
    return {"progress": now["step"] / steps if steps else 0.0, "eta_relative": now["eta_s"],
            "state": {"skipped": False, "interrupted": now["interrupted"], "stopping_generation": False, "job": "",
                      "job_count": now["running"] + now["queued"], "job_timestamp": "0", "job_no": 0,
                      "sampling_step": now["step"], "sampling_steps": steps},
            "current_image": None, "textinfo": None, "current_task": None}


@router.post("/interrupt")
async def interrupt(state: ServerState = Depends(server)) -> dict[str, Any]:
    """Stop the running batch(es) at the next step; their requests answer with what the steps so far made."""
    await state.backend.interrupt()
    return {}


@router.get("/loras")
async def loras(state: ServerState = Depends(server)) -> list[dict[str, Any]]:
    """The LoRAs of --lora-dir as A1111's Lora extension lists them (name, alias, path, metadata)."""
    return [entry.as_a1111() for entry in state.loras.entries()] if state.loras else []


@router.post("/refresh-loras")
async def refresh_loras(state: ServerState = Depends(server)) -> None:
    """Search --lora-dir again (files added or removed since the start)."""
    if state.loras is not None:
        await asyncio.to_thread(state.loras.refresh)


@router.get("/scripts")
async def scripts(state: ServerState = Depends(server)) -> dict[str, list[str]]:
    return {"txt2img": [], "img2img": []}  # no A1111 scripts or extensions here


# ----- helpers -----
def _package(state: ServerState, body: Txt2ImgRequest) -> PackageInfo:
    name = body.override_settings.get("sd_model_checkpoint")
    return state.package(name, "override_settings.sd_model_checkpoint" if name else "sd_model_checkpoint")


def _scheduler(body: Txt2ImgRequest) -> str | None:
    sampler = body.sampler_name or body.sampler_index
    schedule = (body.scheduler or AUTOMATIC).strip()
    if not sampler:
        return None
    if schedule.lower() == AUTOMATIC:
        return sampler
    key = schedule.lower().replace(" ", "_")
    label = SCHEDULE_TYPES.get(key) or next((x for x in SCHEDULE_TYPES.values() if x.lower() == schedule.lower()),
                                            None)
    if label is None:
        raise bad("scheduler", f"must be one of {', '.join(SCHEDULE_TYPES.values())}; got {body.scheduler!r}")
    return f"{sampler} {label}"


def _job(info: PackageInfo, body: Txt2ImgRequest, width: int, height: int, **image: Any) -> GenerationRequest:
    count = body.batch_size * body.n_iter
    if body.batch_size < 1 or body.n_iter < 1:
        raise bad("batch_size" if body.batch_size < 1 else "n_iter", "must be at least 1")
    try:
        seeds = seeds_for(body.seed, count)
    except ValueError as error:
        raise bad("seed", str(error).partition("` ")[2]) from None
    return GenerationRequest(package=info.name, prompts=[body.prompt] * count,
                             negative_prompts=[body.negative_prompt] * count, seeds=seeds, width=width,
                             height=height, steps=body.steps, guidance=body.cfg_scale, scheduler=_scheduler(body),
                             deep_cache=body.deep_cache_interval, **image)


def _controlnet(body: Txt2ImgRequest, info: PackageInfo, state: ServerState) -> dict[str, Any] | None:
    available = [name[len(CONTROLNET_PREFIX):] for name in info.pipe.package.components
                 if name.startswith(CONTROLNET_PREFIX)]
    return controlnet_units(body.alwayson_scripts, available, lambda data, param: _decode(data, param, state, "RGB"))


def _decode(data: str, param: str, state: ServerState, mode: str) -> Image.Image:
    """A1111's base64 images, with or without a `data:image/...;base64,` prefix."""
    text = data.partition(",")[2] if data.startswith("data:") else data
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise bad(param, "is not base64 image data") from None
    check_upload(raw, param, state.config)
    return decode_upload(raw, param, mode)


def _answer(response: Response, info: PackageInfo, body: Txt2ImgRequest, job: GenerationRequest,
            result: GenerationResult, parameters: dict[str, Any]) -> dict[str, Any]:
    response.headers[REPLICA_HEADER] = result.replica
    response.headers[BATCH_HEADER] = str(result.batch_size)
    images = [base64.b64encode(png).decode("ascii") for png in result.pngs] if body.send_images else []
    details = {
        "prompt": body.prompt, "all_prompts": job.shown_prompts or job.prompts, "negative_prompt": body.negative_prompt,
        "all_negative_prompts": job.negative_prompts, "seed": result.seeds[0], "all_seeds": result.seeds,
        "subseed": -1, "all_subseeds": [-1] * len(result.seeds), "subseed_strength": 0, "width": job.width,
        "height": job.height, "sampler_name": job.scheduler or "", "cfg_scale": job.guidance, "steps": job.steps,
        "batch_size": body.batch_size, "restore_faces": False, "face_restoration_model": None,
        "sd_model_name": info.name, "sd_model_hash": info.model_hash, "sd_vae_name": None, "sd_vae_hash": None,
        "seed_resize_from_w": -1, "seed_resize_from_h": -1, "denoising_strength": job.strength,
        "extra_generation_params": dict(job.extra_fields), "index_of_first_image": 0, "infotexts": result.infotexts,
        "styles": body.styles, "job_timestamp": time.strftime("%Y%m%d%H%M%S"), "clip_skip": 1,
        "is_using_inpainting_conditioning": False, "interrupted": result.interrupted,
        "version": f"diffrt {__version__}",
    }
    return {"images": images, "parameters": parameters, "info": json.dumps(details)}
