"""Dressing-Attention: patches every self-attention layer of the target UNet, and takes it out again.

Two ways to attend to the garments, chosen by whether projections are given:
- additive (docs/method.md DA): Z = Attn(x) + lambda * softmax(Q K'^T / sqrt(d)) V', with K'/V' from the
  trainable projections. The frozen attention runs through whatever forward the WebUI has active and
  the garment term is added after it: to_out is linear, so to_out(A + lambda B) = to_out(A) + lambda B W_o^T.
- joint (training-free): the garment tokens, projected by the layer's own W_k/W_v, join the frozen
  self-attention's keys and values (reference-only style); strength and weights are logit offsets.
K'/V' depend only on the garments, so they are computed once at install, not at every step.
`fine_pool` s > 1 pools the garment tokens of the finest layers in s x s windows (token_pool.py):
those layers hold most of the garment tokens and most of the attention cost.

Both ways are written once, on already-projected queries (and the layer's own keys/values), returning
the attention output before to_out. The A1111 path (a forward patch on each attn1) projects and
applies to_out around them; Forge's attn1 replace patches hand over exactly that projected form
(`attend_projected`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..sd.forward_patch import ForwardPatch
from .garments_net import GarmentFeatures
from .projections import DressingProjections
from .regions import garment_bias
from .token_pool import POOL_CHOICES, pool_tokens
from .unet_layers import SelfAttentionLayer, self_attention_layers, token_grid

_MARKER = "_anydressing_dresser"

Attention = Callable[[Tensor, Tensor, Tensor], Tensor]  # (q, k, v) each (B, T, inner) -> (B, T, inner)


@dataclass
class _LayerState:
    layer: SelfAttentionLayer
    features: Tensor  # F_all, (1, N * T, C)
    k: Tensor | None = None  # (1, heads, N * T, d), cached unless recompute_kv
    v: Tensor | None = None
    log_count: Tensor | None = None  # (N * T,) logit offsets of pooled tokens, where they change the softmax


class Dresser:
    """Installs Dressing-Attention on a UNet for one generation; also a context manager.

    `cond_rows` names the batch rows that see the garments (None: all rows); unconditional rows are
    left exactly as the plain UNet computes them (paper eq. 16). `cond_batch`, when set, is the batch
    size those rows refer to: a call with another batch (another extension running attn1 on a
    sub-batch, as ControlNet's reference-only does) sees no garments rather than wrong rows.
    `active` switches the garments off for part of the sampling range without uninstalling.
    """

    def __init__(
        self,
        unet: nn.Module,
        features: GarmentFeatures,
        projections: DressingProjections | None = None,
        *,
        strength: float = 0.7,
        weights: Sequence[float] | None = None,
        regions: Sequence[Tensor | None] | None = None,
        record_attention_mass: bool = False,
        recompute_kv: bool = False,
        fine_pool: int = 1,
    ) -> None:
        n = features.n_garments
        self.weights = [1.0] * n if weights is None else [float(w) for w in weights]
        self.regions = [None] * n if regions is None else list(regions)
        if len(self.weights) != n or len(self.regions) != n:
            raise ValueError(f"{n} garments but {len(self.weights)} weights and {len(self.regions)} regions")
        if any(w < 0 for w in self.weights) or strength < 0:
            raise ValueError("strength and garment weights must be >= 0")
        if fine_pool not in POOL_CHOICES:
            raise ValueError(f"fine_pool must be one of {POOL_CHOICES}, not {fine_pool}")
        if fine_pool > 1 and features.latent_hw is None:
            raise ValueError("pooling needs the garment latents' size (GarmentFeatures.latent_hw)")
        self.unet = unet
        self.features = features
        self.projections = projections
        self.strength = float(strength)
        self.record_attention_mass = record_attention_mass
        self.recompute_kv = recompute_kv
        self.fine_pool = fine_pool
        self.cond_rows: Sequence[int] | None = None
        self.cond_batch: int | None = None
        self.active = True
        self.attention_mass: dict[str, Tensor] = {}
        self._kept = [k for k, w in enumerate(self.weights) if w > 0]  # weight 0 drops the garment
        self._latent_hw: tuple[int, int] | None = None
        self._patches: list[ForwardPatch] = []
        self._hook: Any = None
        self._biases: dict[tuple, tuple[Tensor, Tensor | None]] = {}
        self._row_split: dict[tuple, tuple[Tensor, Tensor]] = {}
        self._states: dict[str, _LayerState] | None = None

    @property
    def installed(self) -> bool:
        return bool(self._patches)

    @property
    def garment_tokens(self) -> dict[str, int]:
        """Garment tokens each prepared layer attends over (all garments, after pooling)."""
        return {} if self._states is None else {n: s.features.shape[1] for n, s in self._states.items()}

    def prepare(self) -> dict[str, SelfAttentionLayer]:
        """Check features and projections against the UNet and compute the garment K/V, patching nothing.

        The layers that will be dressed, by name. `install` patches them; the Forge adapter hands them
        to Forge's UnetPatcher and calls `attend_projected` from there.
        """
        if self._states is None:
            layers = self_attention_layers(self.unet)
            missing = [layer.name for layer in layers if layer.name not in self.features.per_layer]
            if missing:
                raise ValueError(f"garment features lack layers {missing[:3]}: GarmentsNet and UNet do not match")
            if self.projections is not None:
                absent = [layer.name for layer in layers if layer.name not in self.projections.layer_names]
                if absent:
                    raise ValueError(f"Dressing-Attention projections lack layers {absent[:3]}")
            finest = max(self.features.per_layer[layer.name].shape[1] for layer in layers)
            self._states = {layer.name: self._layer_state(layer, finest) for layer in layers}
        return {name: state.layer for name, state in self._states.items()}

    def install(self) -> Dresser:
        """Patch the UNet. Any dresser already on it is removed first: installs never stack."""
        remove_dressing(self.unet)
        self.prepare()
        assert self._states is not None
        try:
            for state in self._states.values():
                self._patches.append(ForwardPatch(state.layer.attn, self._make_forward(state)))
            self._hook = self.unet.register_forward_pre_hook(self._record_latent_hw, with_kwargs=True)
            self.unet.__dict__[_MARKER] = self
        except BaseException:
            self.remove()
            raise
        return self

    def remove(self) -> None:
        """Restore the UNet exactly; safe to call more than once and after a failed forward."""
        for patch in reversed(self._patches):
            patch.restore()
        self._patches.clear()
        self._states = None
        self._biases.clear()
        self._row_split.clear()
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if self.unet.__dict__.get(_MARKER) is self:
            del self.unet.__dict__[_MARKER]

    def __enter__(self) -> Dresser:
        return self.install()

    def __exit__(self, *exc: object) -> None:
        self.remove()

    # --- per layer -----------------------------------------------------------------------------

    def _layer_state(self, layer: SelfAttentionLayer, finest: int) -> _LayerState:
        f = self.features.per_layer[layer.name]
        f = f[self._kept] if len(self._kept) < f.shape[0] else f
        log_count = None
        if self.fine_pool > 1 and f.shape[1] == finest:
            assert self.features.latent_hw is not None
            f, counts = pool_tokens(f, token_grid(f.shape[1], self.features.latent_hw), self.fine_pool)
            # joint: the frozen tokens share the softmax, so the offset always counts; additive: only
            # unequal windows (a grid not divisible by s) change a softmax over garment tokens alone
            if self.projections is None or bool((counts != counts[0]).any()):
                log_count = counts.log().repeat(f.shape[0])
        state = _LayerState(layer, f.reshape(1, -1, f.shape[-1]), log_count=log_count)
        if not self.recompute_kv:
            state.k, state.v = self._garment_kv(state)
        return state

    def _garment_kv(self, state: _LayerState) -> tuple[Tensor, Tensor]:
        attn = state.layer.attn
        if self.projections is None:
            to_k, to_v = attn.to_k, attn.to_v
        else:
            to_k, to_v = self.projections.pair(state.layer.name)
        # In the features' dtype, which is the UNet's compute dtype: Forge may store weights in fp16, fp8
        # or 4 bits and cast them per call, so the weights' own dtype says nothing about the computation.
        f = state.features
        k, v = to_k(f), to_v(f)
        if self.projections is not None:  # additive: weight w_k scales garment k's values
            t = f.shape[1] // max(len(self._kept), 1)
            scale = torch.tensor([self.weights[i] for i in self._kept], dtype=v.dtype, device=v.device)
            v = v * scale.repeat_interleave(t)[None, :, None]
        return _split_heads(k, attn.heads), _split_heads(v, attn.heads)

    def _bias(self, state: _LayerState, n_query: int, device: torch.device, dtype: torch.dtype):
        """(bias, valid) for a query grid, or (None, None) when nothing is masked or offset.

        Cached per grid size and shared by all layers at that level: at 64x96 with two 64x48
        garments one top-level bias is 6144 x 6144 values, built once per generation.
        """
        joint = self.projections is None
        has_regions = any(self.regions[i] is not None for i in self._kept)
        if not has_regions and not joint and state.log_count is None:
            return None, None
        if has_regions and self._latent_hw is None:
            raise RuntimeError("region masks need the UNet called as a module (its latent size is unknown)")
        n_garment_tokens = state.features.shape[1]
        pooled = state.log_count is not None
        key = (n_query, n_garment_tokens, self._latent_hw if has_regions else None, pooled, device, dtype)
        if key not in self._biases:
            grid = token_grid(n_query, self._latent_hw) if has_regions else (1, 1)
            offsets = [math.log(self.strength * self.weights[i]) for i in self._kept] if joint else None
            regions = [self.regions[i] for i in self._kept]
            bias, valid = garment_bias(
                regions, grid, n_garment_tokens // len(self._kept), offsets, with_own_tokens=joint
            )
            if pooled:
                bias = bias + state.log_count.to(bias.device)
            self._biases[key] = (bias.to(device, dtype), valid.to(device, dtype) if has_regions and not joint else None)
        return self._biases[key]

    def _record_latent_hw(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        x = args[0] if args else kwargs.get("x")
        if isinstance(x, Tensor) and x.ndim == 4:
            self._latent_hw = (x.shape[-2], x.shape[-1])

    def _rows(
        self, batch: int, device: torch.device, cond_rows: Sequence[int] | None, cond_batch: int | None
    ) -> tuple[Tensor, Tensor]:
        """(conditional rows, the other rows) of a call, as index tensors.

        Built once per row layout and reused by all 16 layers of every call with that layout: no
        per-layer host-to-device copy or device sync.
        """
        cond = None if cond_rows is None else tuple(sorted({int(r) for r in cond_rows}))
        key = (cond, cond_batch, batch, device)
        if key not in self._row_split:
            if cond_batch is not None and batch != cond_batch:
                rows: list[int] = []
            elif cond is None:
                rows = list(range(batch))
            else:
                if cond and not 0 <= cond[0] <= cond[-1] < batch:
                    raise IndexError(f"conditional rows {list(cond)} outside a batch of {batch}")
                rows = list(cond)
            others = [i for i in range(batch) if i not in set(rows)]
            self._row_split[key] = (
                torch.tensor(rows, dtype=torch.long, device=device),
                torch.tensor(others, dtype=torch.long, device=device),
            )
        return self._row_split[key]

    def _dressing(self, rows: Tensor) -> bool:
        return self.active and bool(self._kept) and self.strength != 0 and rows.numel() > 0

    def _make_forward(self, state: _LayerState):
        """A1111: attn1's forward, with the frozen attention left to whatever forward is active."""
        attn = state.layer.attn

        def make(inner):
            def forward(x: Tensor, context: Tensor | None = None, *args: Any, **kwargs: Any) -> Tensor:
                rows, others = self._rows(x.shape[0], x.device, self.cond_rows, self.cond_batch)
                if not self._dressing(rows):
                    return inner(x, context, *args, **kwargs)
                xr = x.index_select(0, rows)
                if self.projections is not None:
                    out = inner(x, context, *args, **kwargs)
                    da = F.linear(self._garment_attention(state, attn.to_q(xr)), attn.to_out[0].weight)
                    return out.index_add(0, rows, da.to(out.dtype))
                ctx = xr if context is None else context.index_select(0, rows)
                cond = attn.to_out(self._joint_attention(state, attn.to_q(xr), attn.to_k(ctx), attn.to_v(ctx)))
                if others.numel() == 0:
                    return cond
                other_ctx = None if context is None else context.index_select(0, others)
                return _merge_rows(rows, cond, others, inner(x.index_select(0, others), other_ctx, *args, **kwargs))

            return forward

        return make

    def attend_projected(
        self,
        layer_name: str,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        frozen: Attention,
        *,
        cond_rows: Sequence[int],
        latent_hw: tuple[int, int] | None = None,
        plain: Attention | None = None,
    ) -> Tensor:
        """One dressed self-attention call from projected q, k, v (B, T, inner): the output before to_out.

        This is the form Forge's attn1 replace patches receive and return. `frozen(q, k, v)` is the
        attention the call would run without garments; `cond_rows` are the rows that see them.
        `plain`, given when `frozen` is another extension's patch rather than the plain attention:
        `frozen` then runs on the whole batch, as that extension expects, and the garments add their
        change to its result (joint: joint attention minus `plain` on the conditional rows) instead of
        replacing it. `latent_hw` is the UNet input's latent size, for region masks.
        """
        if self._states is None:
            raise RuntimeError("prepare() the dresser before calling attend_projected")
        state = self._states[layer_name]
        if latent_hw is not None:
            self._latent_hw = latent_hw
        rows, others = self._rows(q.shape[0], q.device, cond_rows, None)
        if not self._dressing(rows):
            return frozen(q, k, v)
        qr = q.index_select(0, rows)
        if self.projections is not None:
            out = frozen(q, k, v)
            return out.index_add(0, rows, self._garment_attention(state, qr).to(out.dtype))
        joint = self._joint_attention(state, qr, k.index_select(0, rows), v.index_select(0, rows))
        if plain is not None:
            out = frozen(q, k, v)
            change = joint - plain(qr, k.index_select(0, rows), v.index_select(0, rows))
            return out.index_add(0, rows, change.to(out.dtype))
        if others.numel() == 0:
            return joint
        rest = frozen(q.index_select(0, others), k.index_select(0, others), v.index_select(0, others))
        return _merge_rows(rows, joint, others, rest)

    def _kv(self, state: _LayerState) -> tuple[Tensor, Tensor]:
        return (state.k, state.v) if state.k is not None else self._garment_kv(state)

    def _garment_attention(self, state: _LayerState, q: Tensor) -> Tensor:
        """lambda * softmax(Q K'^T / sqrt(d)) V' (eq. 6's garment term before to_out) for projected q: (R, T, inner)."""
        qh = _split_heads(q, state.layer.attn.heads)
        k, v = self._kv(state)
        bias, valid = self._bias(state, q.shape[1], q.device, q.dtype)
        out = _merge_heads(self._attend(state, qh, k.to(q.dtype), v.to(q.dtype), bias, garment_start=0, valid=valid))
        if valid is not None:
            out = out * valid
        return out * self.strength

    def _joint_attention(self, state: _LayerState, q: Tensor, k_own: Tensor, v_own: Tensor) -> Tensor:
        """Frozen self-attention over [own tokens; garment tokens], before to_out; all (R, T, inner)."""
        heads = state.layer.attn.heads
        qh, k_own, v_own = _split_heads(q, heads), _split_heads(k_own, heads), _split_heads(v_own, heads)
        k, v = self._kv(state)
        r = q.shape[0]
        k = torch.cat([k_own, k.to(q.dtype).expand(r, -1, -1, -1)], dim=2)
        v = torch.cat([v_own, v.to(q.dtype).expand(r, -1, -1, -1)], dim=2)
        g_bias, _ = self._bias(state, q.shape[1], q.device, q.dtype)
        bias = torch.cat([g_bias.new_zeros(g_bias.shape[0], k_own.shape[2]), g_bias], dim=1)
        return _merge_heads(self._attend(state, qh, k, v, bias, garment_start=k_own.shape[2]))

    def _attend(
        self,
        state,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        bias: Tensor | None,
        garment_start: int,
        valid: Tensor | None = None,
    ) -> Tensor:
        if not self.record_attention_mass:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        # A_k, the attention mass each query puts on garment k's tokens, is P @ 1_k: garment indicators
        # appended to the values come out of the same attention call, so P (several GB per top-level
        # layer at 768x576) is never materialised. q and k get zeros to keep one head size (fused kernels).
        n, d = len(self._kept), q.shape[-1]
        tokens = k.shape[-2]
        indicator = torch.zeros(tokens, n, dtype=v.dtype, device=v.device)
        eye = torch.eye(n, dtype=v.dtype, device=v.device)
        indicator[garment_start:] = eye.repeat_interleave((tokens - garment_start) // n, dim=0)
        out = F.scaled_dot_product_attention(
            F.pad(q, (0, n)),
            F.pad(k, (0, n)),
            torch.cat([v, indicator.expand(*v.shape[:-1], n)], dim=-1),
            attn_mask=bias,
            scale=d**-0.5,
        )
        mass = out[..., d:].mean(1)  # averaged over heads -> (R, T, N)
        self.attention_mass[state.layer.name] = mass if valid is None else mass * valid
        return out[..., :d]


def remove_dressing(unet: nn.Module) -> bool:
    """Remove whatever Dresser is installed on `unet` (e.g. one left by a generation that raised)."""
    dresser = unet.__dict__.get(_MARKER)
    if dresser is None:
        return False
    dresser.remove()
    return True


def _merge_rows(rows: Tensor, cond: Tensor, others: Tensor, rest: Tensor) -> Tensor:
    """The batch back in order from its conditional rows and the other rows."""
    out = torch.empty((rows.numel() + others.numel(), *cond.shape[1:]), dtype=cond.dtype, device=cond.device)
    return out.index_copy(0, rows, cond).index_copy(0, others, rest.to(cond.dtype))


def _split_heads(t: Tensor, heads: int) -> Tensor:
    return t.unflatten(-1, (heads, -1)).transpose(1, 2)


def _merge_heads(t: Tensor) -> Tensor:
    return t.transpose(1, 2).flatten(-2)
