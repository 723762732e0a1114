"""The packages a server serves: opened once at start (engines are created on first use), under their short names."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from diffrt.errors import InputError
from diffrt.runtime.generation import call_defaults, model_name
from diffrt.runtime.infotext import model_hash
from diffrt.serve.config import ServeConfig

if TYPE_CHECKING:
    from diffrt.serve.lora_cache import AdaptedPipelines
    from diffrt.serve.metrics import Metrics

logger = logging.getLogger(__name__)


@dataclass
class PackageInfo:
    """A served package: its name (`model` / `sd_model_checkpoint`), the text-to-image pipeline, and what the APIs
    show and check before queueing (default size and steps, the VAE factor sizes must be multiples of). The default
    steps are the pipeline's, or `--max-steps` when that is lower (a request without `steps` is never refused)."""

    name: str
    source: str
    pipe: Any
    model_hash: str | None
    default_size: int
    size_multiple: int
    default_steps: int
    default_guidance: float
    #: most images one UNet call may take: the UNet's batch range, halved for classifier-free guidance
    max_rows: int

    @property
    def title(self) -> str:
        """A1111's checkpoint title: `name [hash]`."""
        return f"{self.name} [{self.model_hash}]" if self.model_hash else self.name


def open_packages(config: ServeConfig) -> dict[str, PackageInfo]:
    """Each package of `config`, opened (no engine built yet); InputError for a name served twice."""
    infos: dict[str, PackageInfo] = {}
    for source in config.packages:
        name = model_name(source)
        if name in infos:
            raise InputError(f"`PACKAGE` {source!r} has the name {name!r} of another served package: each is "
                             "served under its folder name, which must differ")
        pipe = open_pipeline(config, source)
        if config.deep_cache and config.deep_cache > 1 and pipe.package.deep_cache_branch is None:
            raise InputError(f"`--deep-cache` {config.deep_cache} applies to every served package, and {source!r} was "
                             "exported without DeepCache: export it with `diffrt export SOURCE OUTPUT --deep-cache`, "
                             "or leave --deep-cache out and let requests ask with `deep_cache_interval`")
        defaults = call_defaults(pipe)
        infos[name] = PackageInfo(name, str(source), pipe, model_hash(pipe.package.manifest), pipe.default_size(),
                                  pipe.vae_scale_factor, min(int(defaults["num_inference_steps"]), config.max_steps),
                                  float(defaults["guidance_scale"]), _max_rows(pipe))
    return infos


def open_pipeline(config: ServeConfig, source: str) -> Any:
    """A new text-to-image pipeline of package `source` with the server's provider, threads and weight sharing, no
    engine created yet. A package with ControlNets serves its plain pipelines (its UNet gets zero residuals). Every
    pipeline of one package (the served one, its LoRA variants) shares the weights ONNX Runtime reads in place
    (`share_weights`); `--shared-weights` makes that all of them."""
    from diffrt.runtime.pipelines.auto import plain_pipeline

    options: dict[str, Any] = {} if config.threads is None else {"threads": config.threads}
    options["deep_cache_schedule"] = config.deep_cache_schedule
    if config.shared_weights:
        from diffrt.runtime.engines import shared_weight_options

        options.update(shared_weight_options(config.provider, "--shared-weights"))
    pipe = plain_pipeline("text2image", source, provider=config.provider, **options)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def adapted_pipelines(config: ServeConfig, info: PackageInfo, metrics: Metrics) -> AdaptedPipelines | None:
    """The LoRA-adapted pipelines of a served package (`lora_cache.AdaptedPipelines`), None without --lora-dir."""
    from diffrt.serve.lora_cache import AdaptedPipelines

    if not config.lora_dirs:
        return None
    from diffrt.runtime.engines import check_initializer_overrides

    # TensorRT: the plans LoRA changes must be refittable, checked at start
    check_initializer_overrides(config.provider, info.pipe.package, info.pipe.adapters.weights.components())
    return AdaptedPipelines(info.name, lambda: open_pipeline(config, info.source), config.lora_cache, metrics,
                            config.prompt_weighting)


def _max_rows(pipe: Any) -> int:
    """Half the denoiser's largest `batch` (a CFG call runs each image twice); unbounded packages get a large
    number."""
    low_high = pipe.package.component(pipe.denoiser_name).dim_ranges.get("batch")
    return max(1, int(low_high[1]) // 2) if low_high else 1 << 16


def find_package(infos: dict[str, PackageInfo], name: str, param: str) -> PackageInfo:
    """The package called `name` (its name or A1111 title, any case); ServeError 404 naming the served ones."""
    from diffrt.serve.jobs import ServeError

    for info in infos.values():
        if name in (info.name, info.title) or name.lower() in (info.name.lower(), info.title.lower()):
            return info
    raise ServeError(404, f"`{param}` {name!r} is not served here; served: {', '.join(infos)}", param=param,
                     code="model_not_found")
