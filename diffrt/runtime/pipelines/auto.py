"""`AutoPipelineFor*`: pick the pipeline class for a task from the package's model family, as Diffusers does."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from diffrt.runtime.loading import open_package
from diffrt.runtime.pipelines.base import DiffusionPipeline, check_provider, pipe_as
from diffrt.runtime.pipelines.registry import pipeline_class_for_task, plain_class_for


class _AutoPipeline:
    task: str = ""

    def __init__(self) -> None:
        raise TypeError(f"{type(self).__name__} is created with `from_pretrained` or `from_pipe`")

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | Path,
        *,
        provider: str | Sequence[Any] = "cpu",
        revision: str | None = None,
        token: str | bool | None = None,
        cache_dir: str | Path | None = None,
        local_files_only: bool | None = None,
        subfolder: str | None = None,
        variant: str | None = None,
        verify: bool = False,
        scheduler: Any = None,
        **engine_options: Any,
    ) -> DiffusionPipeline:
        """The pipeline class for this task and the package's model family; keywords as `DiffusionPipeline`'s."""
        check_provider(provider)
        package = open_package(pretrained_model_name_or_path, revision=revision, token=token, cache_dir=cache_dir,
                               local_files_only=local_files_only, subfolder=subfolder, variant=variant, verify=verify)
        target = pipeline_class_for_task(cls.task, package.pipeline_class)
        return target(package, provider=provider, scheduler=scheduler, **engine_options)

    @classmethod
    def from_pipe(cls, pipeline: DiffusionPipeline, **overrides: Any) -> DiffusionPipeline:
        """Reuse another pipeline's package, engines and scheduler for this task (no reload)."""
        return pipe_as(pipeline_class_for_task(cls.task, pipeline.package.pipeline_class), pipeline, overrides)


class AutoPipelineForText2Image(_AutoPipeline):
    task = "text2image"


class AutoPipelineForImage2Image(_AutoPipeline):
    task = "image2image"


class AutoPipelineForInpainting(_AutoPipeline):
    task = "inpainting"


def plain_pipeline(task: str, pretrained_model_name_or_path: str | Path, *, revision: str | None = None,
                   **options: Any) -> DiffusionPipeline:
    """The `task` pipeline of a package that runs none of its ControlNets: a ControlNet package's plain
    counterpart (its UNet gets zero residuals, no ControlNet engine is created); any other package's usual one."""
    package = open_package(pretrained_model_name_or_path, revision=revision)
    return pipeline_class_for_task(task, plain_class_for(package.pipeline_class))(package, **options)


def plain_variant(task: str, pipeline: DiffusionPipeline, **overrides: Any) -> DiffusionPipeline:
    """`plain_pipeline`'s class on another pipeline's package and engines (`from_pipe`)."""
    target = pipeline_class_for_task(task, plain_class_for(pipeline.package.pipeline_class))
    return pipe_as(target, pipeline, overrides)
