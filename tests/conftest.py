"""Shared test set-up.

Triton decides at decoration time whether a kernel runs in its interpreter, so TRITON_INTERPRET must
be set before `kernels` is imported: without a GPU, every Triton kernel in the tests is interpreted.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(min(2, torch.get_num_threads()))
