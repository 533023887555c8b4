"""Flax linen ResNet50 in the two published layouts, plus the classification head.

- ``v1``: the Keras ``keras.applications.ResNet50`` layout: the stride of a downsampling block sits
  in its first 1x1 conv, every conv has a bias, BatchNorm epsilon is 1.001e-5.
- ``v1.5``: the torchvision ``resnet50`` layout: the stride sits in the 3x3 conv, convs have no
  bias, BatchNorm epsilon is 1e-5.

Parameter paths are part of the public interface (train.py selects groups by regex over them,
pretrained.py fills them from the published files) and must stay stable::

    stem/conv, stem/bn
    stage{1..4}/block{1..}/conv{1,2,3}, .../bn{1,2,3}, .../proj_conv, .../proj_bn
    head/hidden{1..}, head/out

Inputs are already-normalised float NHWC images (see preprocessing.py); the model does no
preprocessing of its own, so the same module serves every weight source.

The CPU fast path (``config.model.conv_impl``): XLA:CPU runs 3x3 convolutions onto <= 2x2 output
maps and the weight gradients of 1x1 convolutions far slower than their FLOPs suggest, so on CPU
:class:`MatmulConv` computes those as matmuls ("auto"; "im2col" everywhere, "xla" nowhere). The
parameters and results are the same (tests/test_models.py); exports use XLA's convolution. How
each rule was measured: experiments/README.md.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Collection, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

LAYOUTS = ("v1", "v1.5")
STAGE_SIZES = (3, 4, 6, 3)
BACKBONE_MODULES = ("stem", "stage1", "stage2", "stage3", "stage4")
FEATURE_DIM = 2048
_EPSILON = {"v1": 1.001e-5, "v1.5": 1e-5}
CONV_IMPLS = ("auto", "xla", "im2col")
SMALL_MAP = 2  # Largest output map (HxW) on which MatmulConv computes a 3x3 conv as patches @ kernel.


@dataclasses.dataclass(frozen=True)
class MatmulRules:
    """Which convolutions MatmulConv computes as matmuls (experiments/conv_levers.py turns them
    off one at a time to measure each; the defaults are the ones that paid on XLA:CPU)."""

    small_map: bool = True  # 3x3 convs on small maps as patches @ kernel ...
    small_map_on: str = "output"  # ... judged by the "output" map, or the "input" map (as before)
    one_by_one: bool = True  # 1x1 convs as (strided) activations @ kernel.
    patches: str = "slices"  # Patches as 9 strided slices ("slices") or XLA's "op".


MATMUL_RULES = MatmulRules()


def _bn(
    layout: str, dtype: Any, name: str, use_running_average: bool, axis_name: str | None = None
) -> nn.BatchNorm:
    return nn.BatchNorm(
        use_running_average=use_running_average,
        axis_name=None if use_running_average else axis_name,
        momentum=0.9,
        epsilon=_EPSILON[layout],
        dtype=dtype,
        param_dtype=jnp.float32,
        name=name,
    )


class MatmulConv(nn.Conv):
    """``nn.Conv`` that computes the convolutions XLA:CPU runs slowly as plain matmuls.

    - 3x3 convs whose output map is <= 2x2 (stage3/stage4 at 32x32 inputs, and the stride-2
      first block of stage4 at 64x64) as patches @ kernel: XLA:CPU runs a 3x3 convolution on a
      2x2 or 1x1 map, and the input gradient of a stride-2 one, 20-40x slower per FLOP. The
      patches are 9 strided slices, so their gradient is pads and adds (XLA's patches op has a
      small-map convolution as its gradient).
    - 1x1 convs as activations @ kernel (``x[:, ::s, ::s]`` for stride s): XLA:CPU computes a
      convolution's weight gradient as another convolution over transposed copies of the
      activations, which cost more than the convolutions themselves; a matmul's gradients are
      matmuls on the activations as they are.

    Same parameters, same results to float rounding (tests/test_models.py); experiments/README.md.
    """

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        rule = _matmul_rule(self.kernel_size, self.strides, self.padding, x.shape[1:3])
        if rule is None:
            return super().__call__(x)
        cin = x.shape[-1]
        kh, kw = self.kernel_size
        kernel = self.param(
            "kernel", self.kernel_init, (kh, kw, cin, self.features), self.param_dtype
        )
        x, kernel = jnp.asarray(x, self.dtype), jnp.asarray(kernel, self.dtype)
        if rule == "one_by_one":
            s = tuple(self.strides)
            y = x[:, :: s[0], :: s[1]] @ kernel.reshape(cin, self.features)
        else:
            y = _patches_3x3(x, tuple(self.strides), self.padding) @ kernel.reshape(
                9 * cin, self.features)
        if self.use_bias:
            bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype)
            y = y + jnp.asarray(bias, self.dtype)
        return y


def _patches_3x3(x: jnp.ndarray, strides: tuple, padding: Any) -> jnp.ndarray:
    """(N, H', W', 9 * C) patches ordered (kh, kw, C), as the HWIO kernel flattens.

    As 9 strided slices of the padded input ("slices"), whose gradient is pads and adds, rather
    than XLA's patches op, whose gradient is another small-map convolution on XLA:CPU.
    """
    if MATMUL_RULES.patches == "op":
        p = jax.lax.conv_general_dilated_patches(  # features ordered (C, kh, kw)
            x, (3, 3), strides, padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))
        n, h, w, _ = p.shape
        return p.reshape(n, h, w, -1, 9).swapaxes(-1, -2).reshape(n, h, w, -1)
    (pt, pb), (pl, pr) = padding
    xp = jnp.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
    oh = (xp.shape[1] - 3) // strides[0] + 1
    ow = (xp.shape[2] - 3) // strides[1] + 1
    cols = [xp[:, i:i + strides[0] * (oh - 1) + 1:strides[0], j:j + strides[1] * (ow - 1) + 1:
               strides[1]] for i in range(3) for j in range(3)]
    return jnp.concatenate(cols, axis=-1)


def _matmul_rule(kernel_size, strides, padding, hw) -> str | None:
    """"small_map", "one_by_one" or None (XLA's convolution) for one convolution."""
    rules = MATMUL_RULES
    if tuple(kernel_size) == (1, 1) and rules.one_by_one and _no_padding(padding):
        return "one_by_one"
    out = max(-(-int(n) // int(s)) for n, s in zip(hw, strides))
    size = out if rules.small_map_on == "output" else max(int(n) for n in hw)
    if tuple(kernel_size) == (3, 3) and rules.small_map and size <= SMALL_MAP:
        return "small_map"
    return None


def _no_padding(padding: Any) -> bool:
    return padding == "VALID" or (
        not isinstance(padding, str) and all(tuple(p) == (0, 0) for p in padding))


def use_im2col(conv_impl: str) -> bool:
    """Whether ``conv_impl`` ("auto": on the CPU backend only) selects MatmulConv."""
    if conv_impl not in CONV_IMPLS:
        raise ValueError(f"model.conv_impl must be one of {CONV_IMPLS}, got {conv_impl!r}.")
    return conv_impl == "im2col" or (conv_impl == "auto" and jax.default_backend() == "cpu")


def _conv(
    layout: str, dtype: Any, features: int, kernel: int, stride: int, name: str,
    im2col: bool = False,
) -> nn.Conv:
    pad = (kernel - 1) // 2
    return (MatmulConv if im2col else nn.Conv)(
        features,
        (kernel, kernel),
        strides=(stride, stride),
        padding=((pad, pad), (pad, pad)),
        use_bias=layout == "v1",
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=nn.initializers.variance_scaling(2.0, "fan_out", "normal"),
        name=name,
    )


class Stem(nn.Module):
    """7x7/2 conv, BatchNorm, ReLU, 3x3/2 max pool (both layouts)."""

    layout: str = "v1.5"
    dtype: Any = jnp.float32
    width: int = 64
    bn_axis_name: str | None = None

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        x = _conv(self.layout, self.dtype, self.width, 7, 2, "conv")(x)
        x = nn.relu(_bn(self.layout, self.dtype, "bn", not train, self.bn_axis_name)(x))
        return nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))


class Bottleneck(nn.Module):
    """1x1 -> 3x3 -> 1x1 (x4 expansion) residual block; projection shortcut when shapes change."""

    width: int
    stride: int = 1
    project: bool = False
    layout: str = "v1.5"
    dtype: Any = jnp.float32
    bn_axis_name: str | None = None
    im2col: bool = False

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        s1, s2 = (self.stride, 1) if self.layout == "v1" else (1, self.stride)
        conv = lambda f, k, s, n: _conv(  # noqa: E731
            self.layout, self.dtype, f, k, s, n, self.im2col
        )
        bn = lambda n: _bn(self.layout, self.dtype, n, not train, self.bn_axis_name)  # noqa: E731
        y = nn.relu(bn("bn1")(conv(self.width, 1, s1, "conv1")(x)))
        y = nn.relu(bn("bn2")(conv(self.width, 3, s2, "conv2")(y)))
        y = bn("bn3")(conv(4 * self.width, 1, 1, "conv3")(y))
        if self.project:
            x = bn("proj_bn")(conv(4 * self.width, 1, self.stride, "proj_conv")(x))
        return nn.relu(x + y)


class Stage(nn.Module):
    """A run of bottleneck blocks; the first one downsamples (except in stage 1) and projects."""

    num_blocks: int
    width: int
    stride: int
    layout: str = "v1.5"
    dtype: Any = jnp.float32
    bn_axis_name: str | None = None
    im2col: bool = False

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        for i in range(self.num_blocks):
            x = Bottleneck(
                self.width,
                stride=self.stride if i == 0 else 1,
                project=i == 0,
                layout=self.layout,
                dtype=self.dtype,
                bn_axis_name=self.bn_axis_name,
                im2col=self.im2col,
                name=f"block{i + 1}",
            )(x, train)
        return x


class Head(nn.Module):
    """Pooled features -> optional hidden Dense+ReLU+Dropout layers -> Dense(num_classes).

    The original notebook's "custom dense layers with dropout" are ``hidden=(256,)``,
    ``dropout=0.5``: Dense(256, relu) -> Dropout(0.5) -> Dense(classes), as in Keras. Dropout
    follows every hidden layer, and with no hidden layer acts on the pooled features; never on the
    features *and* after a hidden layer (dropping half of frozen features before Dense(256) made
    that head underfit: 65.8% vs the linear probe's 72.9% in the class-split ablation,
    experiments/README.md). Active only when ``train`` is true.
    """

    num_classes: int
    hidden: Sequence[int] = ()
    dropout: float = 0.0
    zero_init: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, features: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        x = features
        for i, width in enumerate(self.hidden):
            x = nn.relu(nn.Dense(width, dtype=self.dtype, name=f"hidden{i + 1}")(x))
            x = nn.Dropout(self.dropout, deterministic=not train)(x)
        if not self.hidden:
            x = nn.Dropout(self.dropout, deterministic=not train)(x)
        init = nn.initializers.zeros if self.zero_init else nn.initializers.lecun_normal()
        x = nn.Dense(self.num_classes, dtype=self.dtype, kernel_init=init, name="out")(x)
        return x.astype(jnp.float32)


class ResNet50(nn.Module):
    """ResNet50 backbone + classification head.

    ``stage_sizes`` and ``base_width`` exist for tests and smoke runs (a tiny network of the same
    structure and parameter paths); the pretrained weights need the defaults, ResNet50's.

    ``bn_axis_name`` names the mapped device axis over which training-mode BatchNorm averages its
    batch statistics (synchronised BatchNorm: the step gives the same result on any device count).

    ``conv_impl`` picks how the convolutions XLA:CPU runs slowly are computed (MatmulConv: 1x1
    convs and 3x3 convs onto <= 2x2 maps as matmuls): "auto" (as matmuls on CPU, XLA's
    convolution elsewhere), "xla" or "im2col" (always as matmuls); same parameters either way.

    ``train`` switches dropout and BatchNorm to training mode. ``bn_train_modules`` narrows the
    BatchNorm part: only the named top-level modules (of ``BACKBONE_MODULES``) update and use batch
    statistics, the rest run in inference mode; ``None`` means all of them. Frozen groups use it
    so that their BatchNorm statistics stay the pretrained ones.
    """

    num_classes: int = 10
    layout: str = "v1.5"
    head_hidden: Sequence[int] = ()
    head_dropout: float = 0.0
    zero_init_head: bool = True
    dtype: Any = jnp.float32
    stage_sizes: Sequence[int] = STAGE_SIZES
    base_width: int = 64
    bn_axis_name: str | None = None
    conv_impl: str = "auto"

    def setup(self) -> None:
        if self.layout not in LAYOUTS:
            raise ValueError(f"model.layout must be one of {LAYOUTS}, got {self.layout!r}.")
        if len(self.stage_sizes) != 4:
            raise ValueError(f"model.stage_sizes must have 4 entries, got {self.stage_sizes!r}.")
        self.stem = Stem(self.layout, self.dtype, self.base_width, self.bn_axis_name)
        for i, n in enumerate(self.stage_sizes):
            w = self.base_width * 2**i
            stage = Stage(
                n, w, 1 if i == 0 else 2, self.layout, self.dtype, self.bn_axis_name,
                use_im2col(self.conv_impl),
            )
            setattr(self, f"stage{i + 1}", stage)
        self.head = Head(
            self.num_classes, tuple(self.head_hidden), self.head_dropout, self.zero_init_head,
            self.dtype,
        )

    def features(
        self,
        x: jnp.ndarray,
        train: bool = False,
        bn_train_modules: Collection[str] | None = None,
    ) -> jnp.ndarray:
        """Globally average-pooled backbone features, (N, 2048) for ResNet50, float32."""
        x = jnp.asarray(x, self.dtype)
        for name in BACKBONE_MODULES:
            bn_train = train and (bn_train_modules is None or name in bn_train_modules)
            x = getattr(self, name)(x, bn_train)
        return jnp.mean(x.astype(jnp.float32), axis=(1, 2))

    def classify(self, features: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        """Logits from pooled features (the head alone; used for cached-feature training)."""
        return self.head(features, train)

    def __call__(
        self,
        x: jnp.ndarray,
        train: bool = False,
        bn_train_modules: Collection[str] | None = None,
    ) -> jnp.ndarray:
        return self.classify(self.features(x, train, bn_train_modules), train)


def create_model(
    num_classes: int,
    layout: str = "v1.5",
    head_hidden: Sequence[int] = (),
    head_dropout: float = 0.0,
    zero_init_head: bool = True,
    dtype: str | Any = "float32",
    stage_sizes: Sequence[int] = STAGE_SIZES,
    base_width: int = 64,
    bn_axis_name: str | None = None,
    conv_impl: str = "auto",
) -> ResNet50:
    """Build the model from plain values (as they come from a config)."""
    return ResNet50(
        stage_sizes=tuple(stage_sizes),
        base_width=base_width,
        bn_axis_name=bn_axis_name,
        conv_impl=conv_impl,
        num_classes=num_classes,
        layout=layout,
        head_hidden=tuple(head_hidden),
        head_dropout=head_dropout,
        zero_init_head=zero_init_head,
        dtype=jnp.dtype(dtype),
    )
