"""Run inside the Optimum venv (tests/optimum_env.py), never imported by the tests: Optimum's own ONNX Runtime
pipeline on a package folder, one seeded text-to-image call, the image saved as .npy for diffrt to compare with.

usage: python generate.py PACKAGE OUT.npy SEED STEPS SIZE GUIDANCE PROMPT
"""
import sys

import numpy as np
import torch
from optimum.onnxruntime import ORTDiffusionPipeline

folder, out, seed, steps, size, guidance, prompt = sys.argv[1:8]
pipe = ORTDiffusionPipeline.from_pretrained(folder, provider="CPUExecutionProvider")
print(type(pipe).__name__)
images = pipe(prompt, num_inference_steps=int(steps), guidance_scale=float(guidance), height=int(size),
              width=int(size), generator=torch.Generator("cpu").manual_seed(int(seed)), output_type="np").images
np.save(out, np.asarray(images, dtype=np.float32))
