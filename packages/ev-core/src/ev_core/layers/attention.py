"""Attention primitives shared by every ev attention layer.

Calling convention of every ev attention *module*: ``forward(x, hw)`` with tokens
``x: [B, N, C]`` (row-major over an ``H × W`` map, ``N = H·W``) and ``hw = (H, W)``, returning
``[B, N, C]``.

The core op :func:`attend` computes ``softmax(q·kᵀ·scale + bias)·v`` through one of several
*backends*, chosen xformers-style by a small dispatcher:

========================  ====================================================================
``"sdpa"``                :func:`torch.nn.functional.scaled_dot_product_attention`; PyTorch
                          picks the kernel (flash / memory-efficient / cuDNN / math).
``"math"``                explicit matmul → softmax → matmul (timm's ``fused_attn=False``).
``"sdpa_flash"``          SDPA restricted to the FlashAttention kernel (CUDA: fp16/bf16 and no
                          bias; CPU: any float dtype, no dropout, 2-D/4-D mask shapes).
``"sdpa_efficient"``      SDPA restricted to the memory-efficient kernel (CUDA only).
``"sdpa_cudnn"``          SDPA restricted to the cuDNN kernel (CUDA only, fp16/bf16).
``"sdpa_math"``           SDPA restricted to PyTorch's reference math kernel.
========================  ====================================================================

Every backend states, for given inputs, *why* it cannot run
(:meth:`AttentionBackend.not_supported_reasons`); :func:`backend_support` lists them all.
``backend="auto"`` takes the first runnable backend of :data:`AUTO_PRIORITY` (``sdpa``, then
``math``): a handful of dtype/shape comparisons, free under ``torch.compile`` (they become
guards, no graph break). An explicitly named backend that cannot run raises
:class:`AttentionBackendError`, whose message lists the reasons of *every* backend.

Modules settle their backend once, at construction (:func:`settle_backend`): ``None`` takes
the module-wide default (:func:`set_attention_backend`, or ``EV_ATTN_BACKEND`` at import) and
``"auto"`` becomes ``"sdpa"``; their forward then calls :func:`attention`, which runs
``"sdpa"``/``"math"`` directly (no per-call dispatch; TorchScript- and FX-friendly) and checks a
pinned kernel's requirements before running it.
"""

import contextlib
import os
import warnings
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from timm.layers import register_notrace_module
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from ev_core.layers.onednn import fusable, linear_act

__all__ = [
    "ATTENTION_BACKENDS",
    "AUTO_PRIORITY",
    "AttentionBackend",
    "AttentionBackendError",
    "MathBackend",
    "MultiHeadSelfAttention",
    "SDPABackend",
    "attend",
    "attention",
    "attention_backend",
    "backend_support",
    "check_tokens",
    "get_attention_backend",
    "math_attention",
    "resolve_backend",
    "select_backend",
    "set_attention_backend",
    "settle_backend",
]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_HALF_DTYPES = (torch.float16, torch.bfloat16)


class AttentionBackendError(RuntimeError):
    """A requested attention backend cannot run the given inputs (message lists every reason)."""


def check_tokens(x: Tensor, hw: tuple[int, int]) -> tuple[int, int, int, int, int]:
    """Validate tokens ``x: [B, N, C]`` against their map size ``hw = (H, W)``.

    Returns:
        ``(B, N, C, H, W)``.

    Raises:
        ValueError: ``x`` is not 3-D, ``hw`` is not two positive ints, or ``N != H·W``.
    """
    if x.dim() != 3:
        raise ValueError(f"expected tokens [B, N, C], got a tensor of shape {tuple(x.shape)}")
    if len(hw) != 2:
        raise ValueError(f"hw must be (H, W), got {hw!r}")
    H, W = int(hw[0]), int(hw[1])
    B, N, C = x.shape
    if H <= 0 or W <= 0:
        raise ValueError(f"map size must be positive, got (H, W) = ({H}, {W})")
    if N != H * W:
        raise ValueError(f"token count N={N} does not match the map size H·W = {H}·{W} = {H * W}")
    return B, N, C, H, W


def _validate(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, dropout_p: float) -> None:
    """Input errors no backend could fix (raised as ``ValueError`` before dispatch).

    Kept to a few comparisons (shapes are read once): this runs on every attention call.
    """
    dtype = q.dtype
    if k.dtype != dtype or v.dtype != dtype or not dtype.is_floating_point:
        raise ValueError(
            f"q, k, v must share one floating dtype, got q {dtype}, k {k.dtype}, v {v.dtype}"
        )
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v on different devices: {q.device}, {k.device}, {v.device}")
    qs, ks, vs = q.shape, k.shape, v.shape
    nd = len(qs)
    if nd < 2 or len(ks) != nd or len(vs) != nd:
        raise ValueError(f"q, k, v must have the same rank >= 2, got {nd}, {len(ks)}, {len(vs)}")
    if qs[-1] != ks[-1]:
        raise ValueError(f"q and k head dims differ: {qs[-1]} vs {ks[-1]}")
    if ks[:-1] != vs[:-1] or qs[:-2] != ks[:-2]:
        raise ValueError(
            "q, k, v must share their leading (batch, head) dims and k, v their length, got "
            f"q {tuple(qs)}, k {tuple(ks)}, v {tuple(vs)}"
        )
    if bias is not None:
        if bias.dtype != torch.bool and bias.dtype != dtype and bias.dtype != torch.float32:
            raise ValueError(f"bias must be bool, float32 or q's dtype ({dtype}), got {bias.dtype}")
        target = (*qs[:-1], ks[-2])
        bs = bias.shape
        if len(bs) > nd or any(b != 1 and b != t for b, t in zip(bs[::-1], target[::-1])):
            raise ValueError(f"bias of shape {tuple(bs)} does not broadcast to the logits {target}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")


def math_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    bias: Tensor | None = None,
    scale: float | None = None,
    dropout_p: float = 0.0,
) -> Tensor:
    """Explicit ``softmax(q·kᵀ·scale + bias)·v`` (the ``"math"`` backend; any device/dtype).

    A bool ``bias`` is a mask (``True`` = attend). A float32 bias with lower-precision ``q``
    makes the softmax run in float32; the weights are cast back to ``v``'s dtype.
    """
    s = q.shape[-1] ** -0.5 if scale is None else scale
    attn = (q * s) @ k.transpose(-2, -1)
    if bias is not None:
        if bias.dtype == torch.bool:
            attn = attn.masked_fill(~bias, float("-inf"))
        else:
            attn = attn + bias
    attn = attn.softmax(dim=-1).to(v.dtype)
    if dropout_p > 0.0:
        attn = F.dropout(attn, p=dropout_p)
    return attn @ v


class AttentionBackend:
    """One way to compute attention; subclasses state when they cannot run.

    Attributes:
        name: registry name.
        description: one line for listings and error messages.
    """

    name: str = ""
    description: str = ""

    def not_supported_reasons(
        self, q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, dropout_p: float
    ) -> list[str]:
        """Why this backend cannot run these (already validated) inputs; empty = it can."""
        raise NotImplementedError

    def __call__(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        bias: Tensor | None,
        scale: float | None,
        dropout_p: float,
    ) -> Tensor:
        """Compute attention (inputs as in :func:`attend`)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


class MathBackend(AttentionBackend):
    """Explicit maths: ``(q·scale)·kᵀ (+ bias | masked) → softmax → dropout → ·v``.

    Runs on every device and floating dtype. A bool ``bias`` is a mask (``True`` = attend). A
    float32 bias with lower-precision ``q`` makes the softmax run in float32; the weights are
    cast back to ``v``'s dtype before the last product.
    """

    name = "math"
    description = "explicit matmul/softmax maths (any device, any float dtype)"

    def not_supported_reasons(
        self, q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, dropout_p: float
    ) -> list[str]:
        return []

    def __call__(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        bias: Tensor | None,
        scale: float | None,
        dropout_p: float,
    ) -> Tensor:
        return math_attention(q, k, v, bias, scale, dropout_p)


def _torch_cuda_reasons(
    check: Callable[..., bool] | None,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    bias: Tensor | None,
    dropout_p: float,
) -> list[str]:
    """Ask PyTorch itself (``torch.backends.cuda.can_use_*`` in debug mode) why a CUDA kernel
    would be rejected; its debug warnings are the reasons."""
    params_cls = getattr(torch.backends.cuda, "SDPAParams", None)
    if check is None or params_cls is None:
        return []
    if q.dim() == 3:  # SDPA runs [h, N, d] inputs as a batch of one
        q, k, v = q[None], k[None], v[None]
    try:
        params = params_cls(q, k, v, bias, dropout_p, False, False)
    except TypeError:  # torch < 2.5: no enable_gqa argument
        params = params_cls(q, k, v, bias, dropout_p, False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ok = bool(check(params, True))
    if ok:
        return []
    reasons = []
    for w in caught:
        text = str(w.message).split(" (Triggered internally")[0].strip()
        if text and not text.endswith("because:"):
            reasons.append(f"torch: {text}")
    return reasons or [f"torch.backends.cuda.{check.__name__}() returned False"]


class SDPABackend(AttentionBackend):
    """:func:`~torch.nn.functional.scaled_dot_product_attention`, optionally pinned to one kernel.

    Args:
        name: registry name.
        kernel: ``None`` lets PyTorch choose; otherwise the run is wrapped in
            ``torch.nn.attention.sdpa_kernel([kernel])``.
        description: one line for listings.
    """

    def __init__(self, name: str, kernel: SDPBackend | None, description: str) -> None:
        self.name = name
        self.kernel = kernel
        self.description = description

    def not_supported_reasons(
        self, q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, dropout_p: float
    ) -> list[str]:
        if self.kernel is None or self.kernel == SDPBackend.MATH:
            return []
        device = q.device.type
        reasons: list[str] = []
        if self.kernel == SDPBackend.FLASH_ATTENTION:
            if device == "cuda":
                if q.dtype not in _HALF_DTYPES:
                    reasons.append(f"dtype {q.dtype} is not float16/bfloat16 (CUDA flash)")
                if bias is not None:
                    reasons.append("an attention bias/mask is not supported by CUDA flash")
                if q.shape[-1] > 256:
                    reasons.append(f"head dim {q.shape[-1]} > 256 (CUDA flash)")
            elif device == "cpu":
                if q.dtype not in _FLOAT_DTYPES:
                    reasons.append(f"dtype {q.dtype} not supported by CPU flash")
                if dropout_p > 0.0:
                    reasons.append("dropout_p > 0 is not supported by CPU flash")
                if bias is not None and not self._cpu_mask_shape_ok(q, k, bias):
                    reasons.append(
                        f"bias shape {tuple(bias.shape)} is not [Nq|1, Nk|1] or "
                        "[B|1, h|1, Nq|1, Nk|1] (CPU flash)"
                    )
            else:
                reasons.append(f"device {device!r}: flash runs on CUDA and CPU only")
            if v.shape[-1] != q.shape[-1]:
                reasons.append(f"value head dim {v.shape[-1]} != query head dim {q.shape[-1]}")
        elif self.kernel == SDPBackend.EFFICIENT_ATTENTION:
            if device != "cuda":
                reasons.append(f"device {device!r}: memory-efficient attention is CUDA-only")
            if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
                reasons.append(f"dtype {q.dtype} is not float16/bfloat16/float32")
        elif self.kernel == SDPBackend.CUDNN_ATTENTION:
            if device != "cuda":
                reasons.append(f"device {device!r}: cuDNN attention is CUDA-only")
            if q.dtype not in _HALF_DTYPES:
                reasons.append(f"dtype {q.dtype} is not float16/bfloat16 (cuDNN)")
        if q.dim() not in (3, 4):
            reasons.append(f"fused kernels need [B, h, N, d] or [h, N, d] inputs, got {q.dim()}-D")
        if min(q.shape[-2], k.shape[-2]) == 0:
            reasons.append("empty query or key sequence")
        if any(t.stride(-1) != 1 for t in (q, k, v)):
            reasons.append("fused kernels need a contiguous last dim (stride 1) in q, k, v")
        if not reasons and device == "cuda":
            reasons = _torch_cuda_reasons(self._torch_check(), q, k, v, bias, dropout_p)
        return reasons

    @staticmethod
    def _cpu_mask_shape_ok(q: Tensor, k: Tensor, bias: Tensor) -> bool:
        nq, nk = q.shape[-2], k.shape[-2]
        last_ok = bias.shape[-2] in (1, nq) and bias.shape[-1] in (1, nk)
        if bias.dim() == 2:
            return last_ok
        if bias.dim() == 4 and q.dim() in (3, 4):
            b, h = q.shape[:2] if q.dim() == 4 else (1, q.shape[0])
            return last_ok and bias.shape[0] in (1, b) and bias.shape[1] in (1, h)
        return False

    def _torch_check(self) -> Callable[..., bool] | None:
        names = {
            SDPBackend.FLASH_ATTENTION: "can_use_flash_attention",
            SDPBackend.EFFICIENT_ATTENTION: "can_use_efficient_attention",
            SDPBackend.CUDNN_ATTENTION: "can_use_cudnn_attention",
        }
        name = names.get(self.kernel) if self.kernel is not None else None
        return getattr(torch.backends.cuda, name, None) if name else None

    def __call__(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        bias: Tensor | None,
        scale: float | None,
        dropout_p: float,
    ) -> Tensor:
        ctx = sdpa_kernel([self.kernel]) if self.kernel is not None else contextlib.nullcontext()
        with ctx:
            return F.scaled_dot_product_attention(
                q, k, v, attn_mask=bias, dropout_p=dropout_p, scale=scale
            )


#: Every backend by name, in listing order.
ATTENTION_BACKENDS: dict[str, AttentionBackend] = {
    b.name: b
    for b in (
        SDPABackend("sdpa", None, "F.scaled_dot_product_attention, PyTorch picks the kernel"),
        MathBackend(),
        SDPABackend("sdpa_flash", SDPBackend.FLASH_ATTENTION, "SDPA pinned to FlashAttention"),
        SDPABackend(
            "sdpa_efficient", SDPBackend.EFFICIENT_ATTENTION, "SDPA pinned to memory-efficient"
        ),
        SDPABackend("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION, "SDPA pinned to cuDNN"),
        SDPABackend("sdpa_math", SDPBackend.MATH, "SDPA pinned to PyTorch's math kernel"),
    )
}

#: Order in which ``backend="auto"`` tries backends.
AUTO_PRIORITY: tuple[str, ...] = ("sdpa", "math")

_DEFAULT_BACKEND = os.environ.get("EV_ATTN_BACKEND", "auto").strip() or "auto"


def _check_name(name: str) -> str:
    if name != "auto" and name not in ATTENTION_BACKENDS:
        known = ", ".join(["auto", *ATTENTION_BACKENDS])
        raise ValueError(f"unknown attention backend {name!r}; known: {known}")
    return name


def set_attention_backend(name: str) -> None:
    """Set the default backend of modules built afterwards and of ``attend(backend=None)``."""
    global _DEFAULT_BACKEND
    _DEFAULT_BACKEND = _check_name(name)


def get_attention_backend() -> str:
    """The module-wide default backend name."""
    return _check_name(_DEFAULT_BACKEND)


@contextlib.contextmanager
def attention_backend(name: str) -> Iterator[None]:
    """Temporarily set the module-wide default backend (not thread-safe)."""
    previous = get_attention_backend()
    set_attention_backend(name)
    try:
        yield
    finally:
        set_attention_backend(previous)


def resolve_backend(backend: str | None = None) -> str:
    """A per-call setting as a backend name: ``None`` → the module-wide default.

    Raises:
        ValueError: an unknown name.
    """
    return get_attention_backend() if backend is None else _check_name(backend)


def settle_backend(backend: str | None = None) -> str:
    """The concrete backend a module uses, decided once at construction.

    ``None`` takes the module-wide default; ``"auto"`` becomes the first entry of
    :data:`AUTO_PRIORITY` (``"sdpa"``, which runs every input); a registry name stays.

    Raises:
        ValueError: an unknown name.
    """
    name = resolve_backend(backend)
    return AUTO_PRIORITY[0] if name == "auto" else name


def backend_support(
    q: Tensor, k: Tensor, v: Tensor, *, bias: Tensor | None = None, dropout_p: float = 0.0
) -> dict[str, list[str]]:
    """Every backend's reasons for not running these inputs (empty list = it can run)."""
    _validate(q, k, v, bias, dropout_p)
    return {
        name: b.not_supported_reasons(q, k, v, bias, dropout_p)
        for name, b in ATTENTION_BACKENDS.items()
    }


def _format_support(support: dict[str, list[str]]) -> str:
    lines = []
    for name, reasons in support.items():
        status = "; ".join(reasons) if reasons else "available"
        lines.append(f"  `{name}`: {status}")
    return "\n".join(lines)


def _describe(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, dropout_p: float) -> str:
    b = "None" if bias is None else f"{tuple(bias.shape)} {bias.dtype}"
    return (
        f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}, {q.dtype} on "
        f"{q.device}, bias {b}, dropout_p {dropout_p}"
    )


def select_backend(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    bias: Tensor | None = None,
    dropout_p: float = 0.0,
    backend: str = "auto",
) -> AttentionBackend:
    """The backend that will run these inputs.

    Args:
        backend: ``"auto"`` (first runnable of :data:`AUTO_PRIORITY`) or a registry name.

    Raises:
        AttentionBackendError: the named backend (or every auto candidate) cannot run; the
            message lists the reasons of every backend.
    """
    _validate(q, k, v, bias, dropout_p)
    candidates = AUTO_PRIORITY if backend == "auto" else (_check_name(backend),)
    for name in candidates:
        impl = ATTENTION_BACKENDS[name]
        if not impl.not_supported_reasons(q, k, v, bias, dropout_p):
            return impl
    support = backend_support(q, k, v, bias=bias, dropout_p=dropout_p)
    raise AttentionBackendError(
        f"attention backend {backend!r} cannot run {_describe(q, k, v, bias, dropout_p)}.\n"
        f"Backends:\n{_format_support(support)}"
    )


def attend(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    bias: Tensor | None = None,
    scale: float | None = None,
    dropout_p: float = 0.0,
    backend: str | None = None,
) -> Tensor:
    """softmax(q·kᵀ·scale + bias)·v, dispatched per call (inputs validated first).

    Args:
        q: ``[B, h, Nq, d]`` (any leading dims work with ``sdpa``/``math``).
        k: ``[B, h, Nk, d]``.
        v: ``[B, h, Nk, dv]``.
        bias: additive logits bias broadcastable to ``[B, h, Nq, Nk]`` (e.g. a relative
            position bias ``[h, Nq, Nk]`` or a ``-inf`` mask) in ``q``'s dtype or float32, or a
            bool mask (``True`` = attend). Every query row must keep at least one key.
        scale: logit scale, default ``d ** -0.5``.
        dropout_p: attention dropout probability (pass 0 in eval).
        backend: ``"auto"``, a name of :data:`ATTENTION_BACKENDS`, or ``None`` (default).

    Returns:
        ``[B, h, Nq, dv]`` in ``q``'s dtype.

    Raises:
        ValueError: inconsistent inputs (dtypes, devices, shapes, dropout) or an unknown name.
        AttentionBackendError: the requested backend cannot run these inputs.
    """
    name = resolve_backend(backend)
    impl = select_backend(q, k, v, bias=bias, dropout_p=dropout_p, backend=name)
    return impl(q, k, v, bias, scale, dropout_p)


@torch.jit.unused
def _attention_pinned(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    bias: Tensor | None,
    scale: float | None,
    dropout_p: float,
    backend: str,
) -> Tensor:
    return select_backend(q, k, v, bias=bias, dropout_p=dropout_p, backend=backend)(
        q, k, v, bias, scale, dropout_p
    )


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    bias: Tensor | None,
    scale: float | None,
    dropout_p: float,
    backend: str,
) -> Tensor:
    """Attention with a backend already settled (:func:`settle_backend`): the modules' path.

    ``"sdpa"`` and ``"math"`` run directly, without the per-call checks of :func:`attend`
    (TorchScript, FX and ``torch.compile`` see plain tensor ops); a pinned SDPA kernel is checked
    and run through :func:`select_backend` (eager only; scripted modules use ``"sdpa"``).

    Args:
        q, k, v, bias, scale, dropout_p: as in :func:`attend`.
        backend: a concrete backend name (not ``"auto"``).

    Returns:
        ``[B, h, Nq, dv]``.
    """
    if backend == "math":
        return math_attention(q, k, v, bias, scale, dropout_p)
    if torch.jit.is_scripting():
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=bias, dropout_p=dropout_p, scale=scale
        )
    else:
        if backend == "sdpa":
            return F.scaled_dot_product_attention(
                q, k, v, attn_mask=bias, dropout_p=dropout_p, scale=scale
            )
        return _attention_pinned(q, k, v, bias, scale, dropout_p, backend)


@register_notrace_module  # token-shape checks: an FX leaf
class MultiHeadSelfAttention(nn.Module):
    """Global multi-head self-attention (ViT / LIT-Ti), O(N²C).

    Parameter names (``qkv``, ``proj``) follow timm and the official LIT code.

    Args:
        dim: channels ``C``.
        num_heads: heads ``h`` (``C`` divisible by ``h``).
        qkv_bias: bias on the qkv projection.
        qk_scale: logit scale override (default ``d ** -0.5``).
        attn_drop: attention dropout.
        proj_drop: output dropout.
        backend: attention backend (see :func:`settle_backend`), settled at construction.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        if num_heads <= 0 or dim % num_heads != 0:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale: float = qk_scale if qk_scale is not None else self.head_dim**-0.5
        self.backend: str = settle_backend(backend)
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(
        self, x: Tensor, hw: tuple[int, int] | None = None, bias: Tensor | None = None
    ) -> Tensor:
        """Args:
            x: ``[B, N, C]``.
            hw: ``(H, W)`` with ``H·W = N`` (only checked: global attention has no spatial
                structure), or ``None`` for token sets without a map (e.g. with a cls token).
            bias: optional additive logits bias broadcastable to ``[B, h, N, N]``.

        Returns:
            ``[B, N, C]``.
        """
        if hw is not None and x.dim() == 3 and x.shape[1] != hw[0] * hw[1]:
            raise ValueError(
                f"token count N={x.shape[1]} does not match the map size H·W = {hw[0]}·{hw[1]}"
            )
        return self.forward_tokens(x, bias)

    @torch.jit.unused
    def _fusable(self, x: Tensor) -> bool:
        return fusable(x, self.qkv, self.proj)

    def forward_tokens(self, x: Tensor, bias: Tensor | None = None) -> Tensor:
        """Attention over the token set ``x: [B, N, C]`` with an optional logits bias."""
        if x.dim() != 3:
            raise ValueError(f"expected tokens [B, N, C], got shape {x.shape}")
        B, N, C = x.shape[0], x.shape[1], x.shape[2]
        fused = False if torch.jit.is_scripting() else self._fusable(x)
        qkv = linear_act(x, self.qkv.weight, self.qkv.bias) if fused else self.qkv(x)
        qkv = qkv.reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        dropout_p = self.attn_drop if self.training else 0.0
        out = attention(q, k, v, bias, self.scale, dropout_p, self.backend)
        out = out.transpose(1, 2).reshape(B, N, C)
        out = linear_act(out, self.proj.weight, self.proj.bias) if fused else self.proj(out)
        return self.proj_drop(out)

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, head_dim={self.head_dim}, backend={self.backend!r}"
