"""What both APIs turn a request into (`GenerationRequest`), what a worker hands back (`GenerationResult`), and the
errors that carry an HTTP status (`ServeError`). Plain data, picklable: Ray Serve sends them between processes."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Hashable

TASKS = ("text2image", "image2image", "inpainting")
REPLICA_HEADER = "X-Diffrt-Replica"  # response header: which process made the images (Ray Serve replicas differ)
BATCH_HEADER = "X-Diffrt-Batch-Size"  # response header: images in the pipeline call that made this request's


@dataclass(frozen=True)
class LoraUse:
    """A LoRA file applied to a request, with A1111's text-encoder and UNet multipliers. `param` (the request field
    it came from) names it in errors and takes no part in equality: requests with equal LoRA sets share a batch."""

    name: str
    path: str
    text_encoder_scale: float
    unet_scale: float
    param: str = field(default="prompt", compare=False)


class ServeError(Exception):
    """An error with the HTTP status to answer and, for OpenAI's error shape, the parameter it is about."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.kind = kind
        self.headers = headers or {}

    def __reduce__(self) -> Any:  # keep every field through pickling (Ray)
        return (ServeError, (self.status, self.message, self.param, self.code, self.kind, self.headers))


@dataclass
class GenerationRequest:
    """One request: `len(seeds)` images, image i from `prompts[i]`, `negative_prompts[i]` and `seeds[i]`.
    `image` / `mask` are PIL images for image-to-image and inpainting."""

    package: str
    prompts: list[str]
    negative_prompts: list[str]
    seeds: list[int]
    width: int
    height: int
    steps: int
    guidance: float
    scheduler: str | None = None
    image: Any = None
    mask: Any = None
    strength: float | None = None
    #: 77-token chunks of the longest prompt (set by the package's worker): only equal counts share a call
    prompt_chunks: int = 1
    #: ControlNet arguments (names, images, scales, starts, ends, guess_mode), from A1111's alwayson_scripts
    controlnet: dict[str, Any] | None = None
    #: the LoRAs applied to every image, in a canonical order (the batch key and the adapted-pipeline cache key)
    loras: tuple[LoraUse, ...] = ()
    #: the prompts as sent, for the infotext, when `prompts` differ (A1111 keeps `<lora:...>` tags there)
    shown_prompts: list[str] | None = None
    #: infotext fields beyond the generation's own (A1111's `extra_generation_params`, e.g. "Lora hashes")
    extra_fields: dict[str, str] = field(default_factory=dict)
    #: DeepCache's interval as asked (None: the server's default); `check_request` settles it: N >= 2, or None (off)
    deep_cache: int | None = None

    @property
    def task(self) -> str:
        return "inpainting" if self.mask is not None else "image2image" if self.image is not None else "text2image"

    @property
    def rows(self) -> int:
        return len(self.seeds)

    def batch_key(self) -> Hashable:
        """Requests with equal keys share UNet calls: same task, size, steps, scheduler, guidance, prompt chunk
        count and LoRA set. Requests with an input image are never combined (each has its own image to encode)."""
        if self.task != "text2image" or self.controlnet is not None:  # its own images to condition on
            return ("own", id(self))
        return (self.task, self.width, self.height, self.steps, self.scheduler, self.guidance, self.prompt_chunks,
                self.loras, self.deep_cache)


@dataclass
class GenerationResult:
    """PNG bytes (with the infotext) per image, the seeds and infotexts, the batch's stage timings, whether an
    interrupt stopped it early (A1111 returns what the steps so far made), and which replica made it."""

    pngs: list[bytes]
    seeds: list[int]
    infotexts: list[str]
    timings: dict[str, float] = field(default_factory=dict)
    batch_size: int = 1
    interrupted: bool = False
    replica: str = ""
