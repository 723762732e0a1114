"""The server's settings: what `diffrt serve` parses and `create_app` / the Ray application take."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_PORT = 7860  # AUTOMATIC1111's port: tools built for its API find the server where they expect it


@dataclass
class ServeConfig:
    """`packages`: folders, Hub ids or built-in names, each served under its short name (the first is the default
    model). Limits are checked before a request is queued; `timeout` is seconds from arrival to answer."""

    packages: list[str]
    provider: str = "cpu"
    threads: int | None = None
    api_key: str | None = None
    max_batch: int = 8
    batch_wait_ms: float = 10.0
    max_queue: int = 64
    max_pixels: int = 1024 * 1024
    max_steps: int = 150
    max_images: int = 8
    max_prompt_chars: int = 4000
    max_upload_bytes: int = 20 * 1024 * 1024
    timeout: float = 300.0
    output_dir: Path | None = None
    cors_origins: list[str] = field(default_factory=list)
    warmup: bool = True
    #: how prompts are read: "a1111" (emphasis, BREAK, long prompts; A1111's API clients send this syntax) or None
    prompt_weighting: str | None = "a1111"
    #: seconds SIGTERM waits for requests in flight before the server stops anyway
    grace_period: float = 30.0
    #: A1111's `models/Lora` folders: their `*.safetensors` (searched recursively) are applied by name per request
    lora_dirs: list[Path] = field(default_factory=list)
    #: adapted pipelines kept per package, least recently used evicted (each holds its own engines)
    lora_cache: int = 2
    #: ONNX Runtime CPU: every pipeline of a package (LoRA variants included) reads one shared copy of its weights
    #: in place, instead of pre-packed / reordered copies of its own: less memory per pipeline, slower steps
    shared_weights: bool = False
    #: DeepCache's interval for requests that do not set `deep_cache_interval` (None or 1: off); every package
    #: served must have been exported with DeepCache when it is 2 or more
    deep_cache: int | None = None
    #: which steps of a DeepCache request run the full UNet: "uniform" or "nonuniform"
    #: (`DiffusionPipeline.deep_cache_schedule`)
    deep_cache_schedule: str = "uniform"
