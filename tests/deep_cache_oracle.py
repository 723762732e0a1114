"""A test-only DeepCache on Diffusers' own `UNet2DConditionModel`, built the way DeepCache's helper does it.

DeepCache's `DeepCacheSDHelper` (github horseee/DeepCache, DeepCache/extension/deepcache.py) wraps the forward of
every resnet, spatial transformer, down/upsampler and block of a Diffusers UNet: on a full step each runs and keeps
its output; on a cached step a module deeper than the cache position returns its output of the last full step
instead of running. The position is (`cache_block_id`, `cache_layer_id`): down blocks before it and their layers
below it run, up-path layers at or above it run (up blocks and their layers counted from the output end). Nothing
here shares code with diffrt: it patches module forwards, where diffrt exports a shallow graph.

DeepCache's helper derives the position from its `cache_branch_id` as `id // 3`, `id % 3`, which holds for UNets
whose blocks have 3 skip connections (SD, SDXL); `position` generalises it to any layer count, so the tiny test
UNets (2 per block) can be checked at every branch.
"""
from __future__ import annotations

from typing import Any


def position(unet: Any, branch: int) -> tuple[int, int]:
    """(cache_block_id, cache_layer_id) of skip branch `branch` (skip connection `branch`, conv_in's output 0)."""
    offset = 0
    for block_id, block in enumerate(unet.down_blocks):
        states = len(block.resnets) + (block.downsamplers is not None)
        if branch - offset < states or block_id == len(unet.down_blocks) - 1:
            return block_id, branch - offset
        offset += states
    raise ValueError(branch)


class DeepCacheOracle:
    """`with DeepCacheOracle(pipe.unet, interval, branch):` the UNet caches as DeepCache's helper makes it; the
    full UNet runs at its calls 0, interval, 2 * interval, ... (counted from entering the context), or at the calls
    in `full_calls` when given (the paper's non-uniform strategy, which the helper leaves to its caller)."""

    def __init__(self, unet: Any, interval: int, branch: int = 0, full_calls: Any = None):
        self.unet, self.interval = unet, interval
        self.full_calls = None if full_calls is None else frozenset(full_calls)
        self.block, self.layer = position(unet, branch)
        self.calls = 0
        self.cache: dict[tuple, Any] = {}
        self.wrapped: list[Any] = []

    def skip(self, kind: str, block: int, layer: int) -> bool:
        """DeepCacheSDHelper.is_skip_step with the uniform schedule (or the calls in `full_calls`)."""
        full = self.calls % self.interval == 0 if self.full_calls is None else self.calls in self.full_calls
        if full:
            return False
        if kind == "mid" or block > self.block:
            return True
        if block < self.block:
            return False
        return layer >= self.layer if kind == "down" else layer > self.layer

    def _wrap(self, module: Any, key: tuple) -> None:
        original = module.forward

        def forward(*args: Any, **kwargs: Any) -> Any:
            if self.skip(*key[:1], *key[2:]):
                return self.cache[key]
            self.cache[key] = original(*args, **kwargs)
            return self.cache[key]

        module.forward = forward
        self.wrapped.append(module)

    def _wrap_block(self, block: Any, kind: str, block_id: int, layer_of) -> None:
        for i, attention in enumerate(getattr(block, "attentions", None) or []):
            self._wrap(attention, (kind, "attention", block_id, layer_of(i)))
        for i, resnet in enumerate(block.resnets):
            self._wrap(resnet, (kind, "resnet", block_id, layer_of(i)))
        samplers = getattr(block, "downsamplers" if kind == "down" else "upsamplers", None) or []
        for sampler in samplers:
            self._wrap(sampler, (kind, "sampler", block_id, len(block.resnets) if kind == "down" else 0))
        self._wrap(block, (kind, "block", block_id, 0))

    def __enter__(self) -> "DeepCacheOracle":
        unet = self.unet
        for block_id, block in enumerate(unet.down_blocks):
            self._wrap_block(block, "down", block_id, lambda i: i)
        self._wrap(unet.mid_block, ("mid", "mid_block", 0, 0))
        count = len(unet.up_blocks)
        for index, block in enumerate(unet.up_blocks):
            layers = len(block.resnets)
            self._wrap_block(block, "up", count - index - 1, lambda i, layers=layers: layers - i - 1)
        original = unet.forward

        def counted(*args: Any, **kwargs: Any) -> Any:
            try:
                return original(*args, **kwargs)
            finally:
                self.calls += 1

        unet.forward = counted
        self.wrapped.append(unet)
        return self

    def __exit__(self, *exc: Any) -> None:
        for module in self.wrapped:
            del module.forward  # the instance attribute: the class's forward again
        self.wrapped.clear()
