"""In-kernel pieces shared by the Triton (``pallas_kernel.py``) and TPU (``tpu_kernel.py``) kernels of
``local_global_attention``, and the Mosaic GPU ones' constants: the mask fill value, log2(e) for
exp2-based softmax, float32-accumulating tile dots and the walk over a row's block table."""
from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
from jax import lax

MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)
LOG2_E = math.log2(math.e)


def dot_nt(a, b):
    """a @ b.T with float32 accumulation."""
    return lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def dot_tn(a, b):
    """a.T @ b with float32 accumulation."""
    return lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def dot(a, b):
    return jnp.dot(a, b, preferred_element_type=jnp.float32)


def walk(table_ref, row, body, carry):
    """Runs ``body(inner_block, carry, masked)`` over the full, then the partial blocks of a row."""
    n_full = table_ref[row]
    n_part = table_ref[row + 1]
    carry = lax.fori_loop(0, n_full, lambda t, c: body(table_ref[row + 2 + t], c, False), carry)
    return lax.fori_loop(n_full, n_full + n_part, lambda t, c: body(table_ref[row + 2 + t], c, True), carry)
