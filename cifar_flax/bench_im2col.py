"""Experiment: 3x3 convolutions on tiny feature maps (<= 2x2) as patches @ kernel (im2col).

XLA:CPU (jaxlib 0.10.2) runs a 3x3 convolution on a 2x2 or 1x1 feature map 20-40x slower per
FLOP than on 4x4 (ResNet50 stage3/stage4 at 32x32 inputs); the same arithmetic as patch
extraction + one matmul is 5-13x faster there. Same parameters (kernel (3, 3, in, out)), same
results to float rounding. Benchmark-only switch (``CIFAR_FLAX_BENCH_IM2COL=1`` for the
flax_bare row) until models.py adopts it.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cifar_flax import models

MAX_SPATIAL = 2


class SmallMapConv(nn.Conv):
    """nn.Conv that switches to im2col + matmul when the input map is at most 2x2."""

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        if self.kernel_size != (3, 3) or max(x.shape[1:3]) > MAX_SPATIAL:
            return super().__call__(x)
        cin = x.shape[-1]
        kernel = self.param("kernel", self.kernel_init, (3, 3, cin, self.features),
                            self.param_dtype)
        x, kernel = jnp.asarray(x, self.dtype), jnp.asarray(kernel, self.dtype)
        patches = jax.lax.conv_general_dilated_patches(
            x, (3, 3), tuple(self.strides), self.padding,
            dimension_numbers=("NHWC", "HWIO", "NHWC"))  # features ordered (cin, kh, kw)
        y = patches @ jnp.transpose(kernel, (2, 0, 1, 3)).reshape(9 * cin, self.features)
        if self.use_bias:
            y = y + jnp.asarray(self.param("bias", self.bias_init, (self.features,),
                                           self.param_dtype), self.dtype)
        return y


def patch_models() -> None:
    """Make models.ResNet50 build its convs as SmallMapConv (call before creating the model)."""

    def _conv(layout: str, dtype: Any, features: int, kernel: int, stride: int, name: str):
        pad = (kernel - 1) // 2
        return SmallMapConv(
            features, (kernel, kernel), strides=(stride, stride), padding=((pad, pad), (pad, pad)),
            use_bias=layout == "v1", dtype=dtype, param_dtype=jnp.float32,
            kernel_init=nn.initializers.variance_scaling(2.0, "fan_out", "normal"), name=name)

    models._conv = _conv
