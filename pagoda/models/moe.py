"""Sparse mixture-of-experts MLP layers (Qwen3-MoE, Mixtral).

The technique is the sparsely gated mixture of experts of Shazeer et al. 2017 ("Outrageously
Large Neural Networks") as Mixtral (Jiang et al. 2024, "Mixtral of Experts") uses it in a
decoder: a router (one linear layer, E -> num_experts) scores every expert for each token,
the token runs through its top-k experts only (each a SwiGLU MLP), and their outputs are
summed weighted by the router's probabilities, softmaxed in fp32 over all experts and, where
the model asks (Mixtral always, Qwen3-MoE with ``norm_topk_prob``), renormalised over the
top k so they sum to 1 (Mixtral's softmax over the top-k logits is the same numbers).

The experts run grouped, not token by token: the (token, expert) pairs of the step are sorted
by expert, and each expert that received tokens runs one gate_up GEMM and one down GEMM over
its rows; the weighted rows are added back to their tokens with one index_add. The Python loop
is over active experts (at most num_experts), never over tokens.

Invariant: each token's output is the same sum of the same terms, in the same order (ascending
expert index, as transformers adds them), as the per-expert reference; only how rows are
grouped into GEMMs differs, so fp32 tokens match transformers'. Shapes: T tokens,
E hidden size, N experts, I an expert's intermediate size, K = experts per token.

With ``--quantization int4`` the experts are held only in 4-bit form (cpu_int4.Int4Experts,
quantized as the checkpoint loads, one matrix at a time): each expert's GEMMs then compute
``x @ dequantize(W).T``, by the 4-bit kernel for a few rows or a dense GEMM over the expert's
dequantized matrix for many; the grouping and the sum order above are unchanged.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from pagoda.models import ops
from pagoda.models.config import ModelArch
from pagoda.models.cpu_int4 import Int4Experts, int4_shape_supported
from pagoda.models.cpu_linear import packed_linear
from pagoda.models.ops import DecoderOps


class Router(nn.Module):
    """The gate: logits (T, N) = x @ weight.T. Not an ``nn.Linear`` on purpose, so that int4
    quantization and weight packing (which wrap every ``nn.Linear``) leave routing exact."""

    def __init__(self, hidden_size: int, num_experts: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


def route(logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """logits (T, N) -> (weights (T, K) fp32, experts (T, K) int64): softmax in fp32 over all
    experts, the k largest, renormalised to sum to 1 if asked."""
    probs = torch.softmax(logits.float(), dim=-1)
    weights, experts = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, experts


class SparseMoE(nn.Module):
    """Router + N SwiGLU experts stacked in two parameters: ``gate_up`` (N, 2I, E) with each
    expert's gate rows then up rows (as the dense MLP's ``gate_up_proj``), ``down`` (N, E, I)."""

    ops: DecoderOps = ops.REFERENCE  # until the model binds its own (bind_ops)
    # Each expert's gate_up and down weights in oneDNN's packed form, where the model runner
    # found that pays on this CPU (pack_experts; cpu_linear.pack_model).
    packed: Optional[tuple[list[torch.Tensor], list[torch.Tensor]]] = None

    def __init__(self, arch: ModelArch) -> None:
        super().__init__()
        n, e, i = arch.num_experts, arch.hidden_size, arch.moe_intermediate_size
        self.num_experts, self.hidden_size, self.intermediate_size = n, e, i
        self.top_k, self.renormalize = arch.num_experts_per_tok, arch.norm_topk_prob
        self.gate = Router(e, n)
        self.gate_up = nn.Parameter(torch.empty(n, 2 * i, e))
        self.down = nn.Parameter(torch.empty(n, e, i))
        # The experts in 4-bit form only (hold_int4 / quantize_experts); then the stacks above
        # are empty.
        self.int4: Optional[Int4Experts] = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (T, E) -> (T, E)."""
        weights, experts = route(self.gate(x), self.top_k, self.renormalize)
        return self.grouped_experts(x, weights, experts)

    def grouped_experts(
        self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor
    ) -> torch.Tensor:
        """Sort the T*K (token, expert) pairs by expert (stable: tokens in order within an
        expert), run each active expert once over its rows, scale each row by its router
        weight and add it to its token in fp32."""
        flat = experts.reshape(-1)  # (T*K,)
        order = torch.argsort(flat, stable=True)
        token_of = order // self.top_k  # the token of each sorted pair
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()
        rows = x.index_select(0, token_of)  # (T*K, E), grouped by expert
        out = torch.empty_like(rows)
        start = 0
        for expert, count in enumerate(counts):
            if count:
                end = start + count
                out[start:end] = self.expert_mlp(expert, rows[start:end])
                start = end
        scaled = out.float() * weights.reshape(-1, 1).index_select(0, order)
        total = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        return total.index_add_(0, token_of, scaled).to(x.dtype)

    def expert_mlp(self, expert: int, rows: torch.Tensor) -> torch.Tensor:
        """One expert's SwiGLU over its rows (R, E) -> (R, E)."""
        if self.int4 is not None:
            h = self.ops.silu_mul(self.int4.gate_up(expert, rows))
            return self.int4.down(expert, h)
        if self.packed is not None:
            gate_up, down = self.packed
            h = self.ops.silu_mul(packed_linear(rows, gate_up[expert]))
            return packed_linear(h, down[expert])
        h = self.ops.silu_mul(F.linear(rows, self.gate_up[expert]))
        return F.linear(h, self.down[expert])

    def expert_matrices(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Each expert's gate_up (2I, E) and down (E, I) weight (views of the stacks)."""
        return list(self.gate_up.detach()), list(self.down.detach())

    def pack_experts(self, pack: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Keep each expert's weights only in ``pack``'s form; the stacked parameters are
        emptied so the model is not held twice."""
        gate_up, down = self.expert_matrices()
        self.packed = ([pack(w) for w in gate_up], [pack(w) for w in down])
        self._empty_stacks()

    def _empty_stacks(self) -> None:
        dtype, device = self.gate_up.dtype, self.gate_up.device
        self.gate_up = nn.Parameter(torch.empty(0, dtype=dtype, device=device), requires_grad=False)
        self.down = nn.Parameter(torch.empty(0, dtype=dtype, device=device), requires_grad=False)

    def int4_supported(self) -> bool:
        """True when the 4-bit kernel takes both expert matrices' shapes."""
        e, i = self.hidden_size, self.intermediate_size
        return int4_shape_supported(2 * i, e) and int4_shape_supported(e, i)

    def hold_int4(self, dtype: torch.dtype) -> bool:
        """Before any weights are loaded (the model on meta): hold the experts in 4-bit form
        only, to be filled by :meth:`load_expert` or :meth:`init_dummy_experts`. False (dense
        experts kept) where the kernel cannot take their shapes."""
        if not self.int4_supported():
            return False
        self.int4 = Int4Experts(self.num_experts, self.hidden_size, self.intermediate_size, dtype)
        self._empty_stacks()
        return True

    @torch.no_grad()
    def quantize_experts(self) -> bool:
        """Loaded dense experts -> 4-bit form only, one expert at a time (the stacks freed at
        the end). False where the kernel cannot take their shapes."""
        if self.int4 is not None or self.packed is not None or not self.int4_supported():
            return False
        n, e, i = self.num_experts, self.hidden_size, self.intermediate_size
        with torch.device(self.gate_up.device):
            int4 = Int4Experts(n, e, i, self.gate_up.dtype)
        for expert in range(n):
            int4.gate_up.store(expert, self.gate_up[expert])
            int4.down.store(expert, self.down[expert])
        self.int4 = int4
        self._empty_stacks()
        return True

    @torch.no_grad()
    def init_dummy_experts(self, generator: torch.Generator, std: float) -> None:
        """Random 4-bit experts: each matrix drawn ~ N(0, std^2) in fp32 and quantized, one at
        a time (the dense model is never held)."""
        assert self.int4 is not None
        device = self.int4.gate_up.packed.device
        for stack in (self.int4.gate_up, self.int4.down):
            for expert in range(self.num_experts):
                w = torch.empty(stack.out_features, stack.in_features, device=device)
                stack.store(expert, w.normal_(0.0, std, generator=generator))

    def load_expert(self, expert: int, matrix: str, tensor: torch.Tensor, source: str) -> None:
        """One expert's checkpoint matrix (``matrix`` a key of ``EXPERT_WEIGHTS``) into the
        dense stacks or, with 4-bit experts, into their 4-bit form."""
        param, half = EXPERT_WEIGHTS[matrix]
        if self.int4 is None:
            copy_expert_weight(getattr(self, param), expert, matrix, tensor, source)
            return
        e, i = self.hidden_size, self.intermediate_size
        expected = (e, i) if half is None else (i, e)
        if tuple(tensor.shape) != expected:
            raise ValueError(
                f"checkpoint tensor {source!r} has shape {tuple(tensor.shape)}, "
                f"the model expects {expected}"
            )
        self.int4.load(expert, half, tensor)


# Checkpoint names of one expert's matrices -> (which stacked parameter, which rows of it):
# Mixtral's w1 (gate), w3 (up), w2 (down); Qwen3-MoE's gate_proj, up_proj, down_proj.
EXPERT_WEIGHTS = {
    "w1": ("gate_up", 0),
    "w3": ("gate_up", 1),
    "w2": ("down", None),
    "gate_proj": ("gate_up", 0),
    "up_proj": ("gate_up", 1),
    "down_proj": ("down", None),
}


def expert_param_name(name: str) -> tuple[str, int, str] | None:
    """A checkpoint name of one expert's matrix (``layers.3.mlp.experts.7.up_proj.weight``,
    ``layers.3.block_sparse_moe.experts.7.w3.weight``, the ``model.`` prefix removed) ->
    (stacked parameter ``layers.3.mlp.gate_up``, expert 7, matrix ``up_proj``); None for any
    other name."""
    parts = name.split(".")
    if len(parts) != 7 or parts[3] != "experts" or parts[5] not in EXPERT_WEIGHTS:
        return None
    param = EXPERT_WEIGHTS[parts[5]][0]
    return ".".join([parts[0], parts[1], "mlp", param]), int(parts[4]), parts[5]


def copy_expert_weight(
    param: torch.Tensor, expert: int, matrix: str, tensor: torch.Tensor, source: str
) -> None:
    """Copy one expert's (out, in) matrix into its slice of a stacked parameter."""
    _, half = EXPERT_WEIGHTS[matrix]
    dest = param.data[expert]
    if half is not None:
        rows = dest.shape[0] // 2
        dest = dest.narrow(0, half * rows, rows)
    if dest.shape != tensor.shape:
        raise ValueError(
            f"checkpoint tensor {source!r} has shape {tuple(tensor.shape)}, "
            f"the model expects {tuple(dest.shape)}"
        )
    dest.copy_(tensor)
