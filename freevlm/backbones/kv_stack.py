"""K/V projections of many layers as one batched matmul (the `kv="propagate"` fill).

When a token leaves at exit e, propagate mode fills every deeper layer's cache with K/V projected from h_e. Layer by
layer that is a norm and two small matmuls per layer whose fixed costs (Python, dispatch, kernel launches) dwarf
their math at batch 1: on the 2-core CPU it cost about three layers' time per early token at the demo's size.

A layer's K/V input is an affine of one normalisation shared by all layers (LayerNorm: (x - mean) / std; T5's
RMSNorm: x / rms; nothing for OPT's post-norm variant), so the affine folds into the projection weights,
W' = W diag(gamma) and b' = W beta + b, computed in float32. Stacked over layers, the fill is one normalisation and
one `baddbmm`. The stacks take the K/V weights' memory once more; they are built when first needed and rebuilt
when a weight changes (version counter or storage), so trained or moved layers are never projected with stale
copies.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class KVInput:
    """What one layer's K/V projection reads: `norm` of the hidden state ("layer", "rms" or None), its weight and
    bias (None where the norm has none), and the key and value linears."""

    norm: str | None
    eps: float
    weight: torch.Tensor | None
    bias: torch.Tensor | None
    k: nn.Linear
    v: nn.Linear
    heads: int
    head_dim: int

    def tensors(self) -> list[torch.Tensor]:
        return [
            t for t in (self.weight, self.bias, self.k.weight, self.k.bias, self.v.weight, self.v.bias) if t is not None
        ]


def _normalise(hidden: torch.Tensor, norm: str | None, eps: float) -> torch.Tensor:
    if norm == "layer":
        return F.layer_norm(hidden.float(), hidden.shape[-1:], eps=eps)
    if norm == "rms":
        hidden = hidden.float()
        return hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + eps)
    return hidden.float()


class KVStack:
    """The folded, stacked K/V weights of a list of layers: `project(hidden)` -> one (keys, values) per layer."""

    def __init__(self, inputs: list[KVInput]):
        first = inputs[0]
        if any(
            (i.norm, i.eps, i.heads, i.head_dim) != (first.norm, first.eps, first.heads, first.head_dim) for i in inputs
        ):
            raise ValueError("layers stacked for K/V projection must share norm, eps and attention shape")
        self.norm, self.eps, self.heads, self.head_dim = first.norm, first.eps, first.heads, first.head_dim
        self.sources = [t for i in inputs for t in i.tensors()]
        self.signature = self._signature()
        weights, biases = [], []
        for i in inputs:
            w = torch.cat([i.k.weight, i.v.weight]).float()  # [2D, H]
            b = torch.cat([_bias(i.k), _bias(i.v)]).float()
            if i.bias is not None:
                b = b + w @ i.bias.float()
            if i.weight is not None:
                w = w * i.weight.float()
            weights.append(w.t())
            biases.append(b)
        dtype = first.k.weight.dtype
        self.weight = torch.stack(weights).to(dtype)  # [L, H, 2D]
        self.bias = torch.stack(biases)[:, None].to(dtype)  # [L, 1, 2D]

    def _signature(self) -> tuple:
        return tuple((t.data_ptr(), t._version) for t in self.sources)

    def fresh(self) -> bool:
        """No weight it was built from changed since (in-place updates bump `_version`; moves change storage)."""
        return self._signature() == self.signature

    def project(self, hidden: torch.Tensor, first: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Keys and values `[B, heads, T, head_dim]` of stacked layers `first:` for `hidden` `[B, T, H]`."""
        batch, length, size = hidden.shape
        weight, bias = self.weight[first:], self.bias[first:]
        normed = _normalise(hidden, self.norm, self.eps).to(weight.dtype).reshape(1, batch * length, size)
        out = torch.baddbmm(bias, normed.expand(len(weight), -1, -1), weight)  # [L, B*T, 2D]
        out = out.view(len(weight), batch, length, 2, self.heads, self.head_dim).permute(3, 0, 1, 4, 2, 5)
        return list(zip(out[0].unbind(0), out[1].unbind(0)))


def _bias(linear: nn.Linear) -> torch.Tensor:
    return linear.bias if linear.bias is not None else linear.weight.new_zeros(linear.out_features)


class KVStacks:
    """Stacks kept per list of layers: the LM's layers (an exit at depth e projects the slice e:) and the exit
    layers (the slice above e), so no weight is stacked twice."""

    def __init__(self):
        self._stacks: dict[tuple[int, ...], tuple[list[nn.Module], KVStack]] = {}  # the layers kept: ids stay unique

    def get(self, layers: list[nn.Module], kv_inputs: Callable[[nn.Module], KVInput | None]) -> KVStack | None:
        """The stack of `layers` (None where a layer's K/V input is not an affine of a shared norm)."""
        key = tuple(id(layer) for layer in layers)
        if key in self._stacks and self._stacks[key][1].fresh():
            return self._stacks[key][1]
        inputs = [kv_inputs(layer) for layer in layers]
        if any(i is None for i in inputs):
            return None
        self._stacks[key] = (list(layers), KVStack(inputs))
        return self._stacks[key][1]
