"""Open the package a `from_pretrained` call names, with Diffusers' Hub keywords.

`cache_dir`, `revision`, `token`, `local_files_only` and `subfolder` choose what is fetched (or found in the
Hugging Face cache); `variant` says which weights the caller expects, which for a model package is the precision its
ONNX graphs were exported in; `verify` hashes every component file against the manifest. These are consumed here,
so they never reach an engine as if they were engine options.
"""
from __future__ import annotations

import os
from typing import Any

from diffrt.errors import InputError, PackageError
from diffrt.package.reader import ModelPackage
from diffrt.runtime.hub import resolve_package

# Diffusers' `variant` names a weight file suffix; for ONNX packages the only variants are the export precisions.
VARIANTS = ("fp32", "fp16", "bf16")


def open_package(
    name_or_path: str | os.PathLike[str],
    *,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    local_files_only: bool | None = None,
    subfolder: str | None = None,
    variant: str | None = None,
    verify: bool = False,
) -> ModelPackage:
    """Resolve (folder, built-in name or Hub repo id) and open a package; `verify=True` also hashes its files."""
    if variant is not None and variant not in VARIANTS:
        raise InputError(f"`variant` must be None or one of {', '.join(VARIANTS)} (a model package's weights are "
                         f"one ONNX export per precision); got {variant!r}")
    if not isinstance(verify, bool):
        raise InputError(f"`verify` must be True or False; got {verify!r}")
    folder = resolve_package(name_or_path, revision=revision, token=token, cache_dir=cache_dir,
                             local_files_only=local_files_only, subfolder=subfolder)
    package = ModelPackage.open(folder)
    if verify:
        package.verify()
    if variant is not None:
        check_variant(package, variant)
    return package


def check_variant(package: ModelPackage, variant: str) -> None:
    """The package's precision must be the `variant` asked for (Diffusers raises when a variant's files are absent)."""
    precision = package_precision(package)
    if precision is not None and precision != variant:
        raise PackageError(f"`variant` {variant!r} asks for {variant} weights, but package {package.root} holds "
                           f"{precision} weights; export one with `diffrt export --precision {variant}`")


def package_precision(package: ModelPackage) -> str | None:
    """The manifest's precision; for a package without one (Optimum's), the dtype of the UNet's `sample` input."""
    if package.manifest is not None:
        value: Any = package.manifest.get("precision")
        return value if isinstance(value, str) else None
    if "unet" not in package.components:
        return None
    inputs = package.graph_io("unet")[0]
    dtype = next((spec.dtype for spec in inputs if spec.name == "sample"), None)
    return {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}.get(str(dtype)) if dtype is not None else None
