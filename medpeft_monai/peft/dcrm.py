"""DCRM-ViT: Domain-Routed Conditional Residual Modulation of a frozen ViT (CVPR 2026, "Keep It Frozen").

A frozen ViT gets four kinds of small trainable parts, all driven by one routing pass per image:

* **Domain Router (DR)** (:class:`DomainRouter`): soft domain probabilities ``D(x) = softmax(logits)``
  over ``K >= 2`` domains (medical / natural, or medical sub-domains). A Domain-Aware Layer (DALer:
  contraction ``d -> d_r``, GELU, expansion ``d_r -> d``, residual) on the pooled image embedding, and a
  parallel gating channel ``g = Conv1x1(x)`` on the token grid (sigmoid, then the strongest response
  anywhere in the image, so small local structures count), concatenated and classified.
* **Parameter Synthesis Network (PSN)** (:class:`ParameterSynthesis`): a fully-connected hypernetwork
  ``[e, D(x)] -> bottleneck (120) -> GELU -> theta(x)`` that writes, per image, the *conditional part*
  of every TALer's parameters: the mixing coefficients over a small learned bank of low-rank bases, the
  two biases and the rescale factor. It never emits whole matrices, so it stays cheap (about 2.4 M
  parameters and 7 MFLOPs per image at ViT-B/16, see :func:`psn_flops`). Its output layer is
  zero-initialised: at initialisation every image gets the static (shared) parameters.
* **Residual Modulation Block (RMB)** (:class:`ResidualModulation`): adds a Task-Alignment Layer (TALer,
  :class:`TALer`) output to the **Q** and **V** parts of the frozen fused ``qkv`` projection's output only,
  ``Q = W_q h + h'_q``, ``V = W_v h + h'_v``. The K part is the frozen projection's own output tensor
  slice, bit for bit.
* **Domain-Aware Bias (DAB)** (:class:`DomainAwareBias`): ``B_d = sum_k p_k B_k`` added to the attention
  logits of every modulated block (``softmax(QK^T / sqrt(d_k) + B_d) V``). ``B_k`` are learned per domain and
  per head, zero-initialised, ``N x N`` including the class/register tokens. ``dab_form="full"`` learns
  every entry (the literal form; ``K * heads * N^2`` parameters per block, 11 M for K=2 at ViT-B/16 224);
  ``dab_form="relative"`` (default) ties patch-patch entries by their relative offset (a
  ``(2H-1)(2W-1)`` table per head and domain, as in Swin's relative position bias) and keeps the
  rows/columns of the prefix tokens free, which is 35x smaller at ViT-B and still an ``N x N`` matrix
  per domain and head.

TALer: the interpretation implemented here
-------------------------------------------
The paper writes ``h' = r * s(W_DS h + b_DS) (*) (W_US s(W_DS h + b_DS) + b_US)`` with
``W_DS in R^{d' x d}``, ``W_US in R^{d x d'}`` and ``s`` = ReLU; the left factor lives in ``R^{d'}`` and
the right one in ``R^d``, so the Hadamard product is undefined as written. We apply the gate **in the
d' space, before the up-projection**::

    u  = ReLU(W_DS(x) h + b_DS(x))                  (d')
    h' = r(x) * (W_US(x) (u (*) u) + b_US(x))       (d)

i.e. the activation gates itself (a squared-ReLU unit) and the product moves in front of ``W_US``, the
only place where both factors have the same size. Why: (1) it uses exactly the quantities of the
formula (one down-projection, one ReLU, one product of the activation with itself, one up-projection
with its bias) and adds no parameters, whereas gating in the ``d`` space would need a second
``d' -> d`` projection for the gate; (2) the cost per token stays that of a rank-``d'`` adapter
(LoRA-like), which is what makes the whole model fit the inference budget; (3) a bottleneck channel
contributes only where the token activates it, and quadratically in that activation, which keeps the
multiplicative (gated) character of the formula; (4) with ``W_US = 0`` and ``b_US = 0`` at
initialisation ``h' = 0`` exactly, so the network starts as the frozen backbone.

Per image, ``W_DS(x) = sum_m c^DS_m(x) A_m`` and ``W_US(x) = sum_m c^US_m(x) B_m`` over a bank of ``M``
bases (``A_m`` Kaiming-uniform, ``B_m`` zeros; stored transposed), ``c(x) = c + dc(x)``, ``b(x) = b + db(x)`` and
``r(x) = r * 2 sigmoid(rho(x))`` (so ``r(x) = r`` when ``rho = 0``), where ``dc, db, rho`` come from the
PSN. The bank, the static coefficients/biases and ``r`` are the modulator parameters that the
bi-level trainer (:mod:`medpeft_monai.engines.bilevel`) adapts in its inner loop.

Router input (one backbone pass): ``route_from_block``
----------------------------------------------------------
The paper computes ``D(x)`` from the frozen backbone's image embedding, which would run the backbone
twice (once to route, once modulated). Here the router and the PSN read the **output of block k**
(``route_from_block``, default a mid-depth block): blocks ``0..k`` run frozen, the router turns their
output into ``D(x)`` and the synthesised parameters, and blocks ``k+1..`` run modulated, all in one pass
(:meth:`~medpeft_monai.backbones.FrozenBackbone.encode`). The image embedding ``e`` is the LayerNorm of the
mean patch token and the gating channel sees the patch tokens as a grid. The routing of a forward pass is
a value (:class:`DCRMRouting`) handed to the modulated blocks as ``context`` and returned with the
network's outputs; no module keeps it, so concurrent forwards (threads, sliding windows) cannot mix.

Ablation switches (paper Table 6): ``use_rmb`` (w/o RMB), ``use_router`` (w/o DR: uniform ``D(x)``, no
router parameters), ``use_psn`` (No PSN: static TALer parameters), ``use_dab`` (w/o DAB: no bias
parameters, the attention modules are not wrapped and get no ``attn_mask``), ``use_rescale`` (w/o
rescale: ``r = 1``, no ``rho``). "No meta-learning" is a trainer setting
(:class:`~medpeft_monai.engines.bilevel.BilevelTrainer` ``mode="joint"``).

Backbones: ViT family (timm ``VisionTransformer`` pre-norm ``Block`` with the standard fused-qkv
``Attention``: ViT, DeiT, DINOv2 incl. register tokens, CLIP). A modulated block runs the block's own
frozen sub-modules (norms, projections, MLP, layer scale, drop path) with the corrections applied, so
adapters inside the block (e.g. a LoRA on ``qkv``) still act; DCRM is applied before any adapter that
wraps whole blocks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from medpeft_monai.backbones import FrozenBackbone, unwrap
from medpeft_monai.peft.core import (
    ParameterCache,
    PeftConfig,
    PeftError,
    PeftModule,
    register_method,
    replace_module,
    select_blocks,
)

__all__ = [
    "DCRMBlock",
    "DCRMConfig",
    "DCRMController",
    "DCRMRouting",
    "DomainAwareBias",
    "DomainRouter",
    "ParameterSynthesis",
    "ResidualModulation",
    "TALer",
    "find_controller",
    "psn_flops",
    "router_flops",
]

DAB_FORMS = ("relative", "full")


class DCRMRouting(NamedTuple):
    """The routing of one forward pass, computed from block ``k``'s output and given to the later blocks.

    Attributes:
        domain_logits: ``(B, K)`` router logits, ``None`` without a router.
        domain_probs: ``(B, K)`` ``D(x)`` (uniform without a router).
        embedding: ``(B, d)`` image embedding fed to the PSN.
        synth: ``{target key: (B, S) tensor}`` per-image TALer parameter deltas, ``None`` without a PSN.
        synth_reg: scalar mean squared synthesised delta (``L_reg``), 0 without a PSN.
    """

    domain_logits: torch.Tensor | None
    domain_probs: torch.Tensor
    embedding: torch.Tensor
    synth: dict[str, torch.Tensor] | None
    synth_reg: torch.Tensor


# ---------------------------------------------------------------------------------------------- TALer


class TALer(nn.Module):
    """Task-Alignment Layer ``h' = r(x) * (W_US(x) (u * u) + b_US(x))``, ``u = ReLU(W_DS(x) h + b_DS(x))``.

    Args:
        width: ``d`` (input and output width).
        rank: ``d'``.
        bank_size: ``M`` low-rank bases per projection.
        rescale: initial value of ``r``.
        use_rescale: ``False``: ``r = 1`` and no per-image ``rho`` (ablation "w/o rescale").
        learn_rescale: train ``r`` (else it is a fixed buffer).

    ``synth_size`` numbers of per-image deltas are read from the PSN, laid out as
    ``[dc_DS (M), dc_US (M), db_DS (d'), db_US (d), rho (1 if use_rescale)]``.
    """

    def __init__(self, width: int, rank: int, bank_size: int, rescale: float = 1.0, use_rescale: bool = True,
                 learn_rescale: bool = True) -> None:
        super().__init__()
        self.width, self.rank, self.bank_size, self.use_rescale = int(width), int(rank), int(bank_size), use_rescale
        down = torch.empty(bank_size, rank, width)
        for m in range(bank_size):
            nn.init.kaiming_uniform_(down[m], a=math.sqrt(5))
        # Stored transposed, so that a per-image mixture is one (B, M) x (M, d*d') product that is already
        # the right operand of a batched matmul.
        self.bank_down = nn.Parameter(down.transpose(1, 2).contiguous())      # A_m^T: (M, d, d')
        self.bank_up = nn.Parameter(torch.zeros(bank_size, rank, width))      # B_m^T: (M, d', d), zero: h' = 0
        c0 = 1.0 / math.sqrt(bank_size)  # a sum of M independent bases keeps one basis' variance
        self.coef_down = nn.Parameter(torch.full((bank_size,), c0))
        self.coef_up = nn.Parameter(torch.full((bank_size,), c0))
        self.bias_down = nn.Parameter(torch.zeros(rank))
        self.bias_up = nn.Parameter(torch.zeros(width))
        if not use_rescale:
            self.rescale = None
        elif learn_rescale:
            self.rescale = nn.Parameter(torch.tensor(float(rescale)))
        else:
            self.register_buffer("rescale", torch.tensor(float(rescale)))

    @property
    def synth_size(self) -> int:
        return 2 * self.bank_size + self.rank + self.width + (1 if self.use_rescale else 0)

    def split_synth(self, s: torch.Tensor) -> tuple[torch.Tensor, ...]:
        m, r, d = self.bank_size, self.rank, self.width
        dc_down, dc_up = s[:, :m], s[:, m:2 * m]
        db_down, db_up = s[:, 2 * m:2 * m + r], s[:, 2 * m + r:2 * m + r + d]
        rho = s[:, 2 * m + r + d] if self.use_rescale else None
        return dc_down, dc_up, db_down, db_up, rho

    def parameters_for(self, synth: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """The effective TALer parameters: static (``synth=None``) or one set per image (leading ``B``).

        ``W_DS_T`` is ``W_DS^T`` (``(d, d')``) and ``W_US_T`` is ``W_US^T`` (``(d', d)``).
        """
        m, d, r = self.bank_size, self.width, self.rank
        if synth is None:
            return {
                "W_DS_T": (self.coef_down @ self.bank_down.reshape(m, d * r)).view(d, r),
                "W_US_T": (self.coef_up @ self.bank_up.reshape(m, r * d)).view(r, d),
                "b_DS": self.bias_down, "b_US": self.bias_up,
                "r": self.rescale if self.rescale is not None else torch.ones((), device=self.bias_up.device),
            }
        dc_down, dc_up, db_down, db_up, rho = self.split_synth(synth)
        b = synth.shape[0]
        out = {
            "W_DS_T": ((self.coef_down + dc_down) @ self.bank_down.reshape(m, d * r)).view(b, d, r),
            "W_US_T": ((self.coef_up + dc_up) @ self.bank_up.reshape(m, r * d)).view(b, r, d),
            "b_DS": self.bias_down + db_down, "b_US": self.bias_up + db_up,
        }
        if self.rescale is None:
            out["r"] = torch.ones(b, device=synth.device, dtype=synth.dtype)
        else:
            out["r"] = self.rescale * 2.0 * torch.sigmoid(rho)
        return out

    def forward(self, h: torch.Tensor, synth: torch.Tensor | None = None) -> torch.Tensor:
        """``h``: ``(B, N, d)``; ``synth``: ``(B, synth_size)`` per-image deltas or ``None``. Returns ``(B, N, d)``."""
        p = self.parameters_for(synth)
        if synth is None:
            u = F.relu(torch.addmm(p["b_DS"], h.reshape(-1, self.width), p["W_DS_T"]))
            out = torch.addmm(p["b_US"], u * u, p["W_US_T"]).view(h.shape)
            return out * p["r"] if self.rescale is not None else out
        if synth.shape[0] != h.shape[0]:
            raise PeftError(f"TALer got {h.shape[0]} token sets but {synth.shape[0]} synthesised parameter sets.")
        u = F.relu(torch.baddbmm(p["b_DS"].unsqueeze(1), h, p["W_DS_T"]))
        out = torch.baddbmm(p["b_US"].unsqueeze(1), u * u, p["W_US_T"])
        return out * p["r"].view(-1, 1, 1) if self.rescale is not None else out


class ResidualModulation(nn.Module):
    """RMB: TALer corrections added to the Q and/or V slices of a fused ``qkv`` output; K is left as it is.

    ``forward(qkv, h, synth)`` returns ``[W_q h + h'_q, W_k h, W_v h + h'_v]`` (timm orders fused rows Q, K,
    V), adding in place to the fresh projection output, so the K slice stays the frozen projection's own
    values.

    Args:
        talers: ``{"q": TALer, "v": TALer}`` (a subset).
        keys: ``{"q": "blocks.3.q", ...}`` names under which the PSN writes each TALer's deltas.
    """

    def __init__(self, talers: dict[str, TALer], keys: dict[str, str]) -> None:
        super().__init__()
        if not set(talers) <= {"q", "v"}:
            raise PeftError(f"DCRM modulates only Q and V (K stays frozen); got parts {sorted(talers)}.")
        self.talers = nn.ModuleDict(talers)
        self.keys = dict(keys)

    def forward(self, qkv: torch.Tensor, h: torch.Tensor, synth: dict[str, torch.Tensor] | None) -> torch.Tensor:
        d = qkv.shape[-1] // 3
        for part, lo in (("q", 0), ("v", 2 * d)):
            if part in self.talers:
                s = None if synth is None else synth[self.keys[part]]
                if s is not None and s.shape[0] != h.shape[0]:
                    raise PeftError(f"TALer got {h.shape[0]} token sets but {s.shape[0]} synthesised parameter sets.")
                qkv[..., lo:lo + d] += self.talers[part](h, s).to(qkv.dtype)
        return qkv


# ---------------------------------------------------------------------------------------------- DAB


class DomainAwareBias(nn.Module):
    """Per-domain, per-head attention-logit biases ``B_k`` (``N x N``, zero-initialised) mixed as ``sum_k p_k B_k``.

    Args:
        num_domains: ``K``.
        num_heads: attention heads.
        grid: patch-token grid ``(H, W)``.
        num_prefix_tokens: class/register tokens in front of the patch tokens.
        form: ``"full"`` (every entry free) or ``"relative"`` (patch-patch entries shared by relative offset,
            prefix rows/columns free).
    """

    def __init__(self, num_domains: int, num_heads: int, grid: tuple[int, int], num_prefix_tokens: int,
                 form: str = "relative") -> None:
        super().__init__()
        if form not in DAB_FORMS:
            raise PeftError(f"dab_form must be one of {DAB_FORMS}, got {form!r}.")
        self.form, self.grid, self.num_prefix_tokens = form, (int(grid[0]), int(grid[1])), int(num_prefix_tokens)
        gh, gw = self.grid
        p, hw = self.num_prefix_tokens, gh * gw
        self.num_tokens = p + hw
        k, h = int(num_domains), int(num_heads)
        self._expanded = ParameterCache()
        if form == "full":
            self.table = nn.Parameter(torch.zeros(k, h, self.num_tokens, self.num_tokens))
            return
        self.table = nn.Parameter(torch.zeros(k, h, (2 * gh - 1) * (2 * gw - 1)))
        ys, xs = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
        ys, xs = ys.flatten(), xs.flatten()
        index = (ys[:, None] - ys[None, :] + gh - 1) * (2 * gw - 1) + (xs[:, None] - xs[None, :] + gw - 1)
        self.register_buffer("rel_index", index, persistent=False)
        self.prefix_rows = nn.Parameter(torch.zeros(k, h, p, self.num_tokens)) if p else None
        self.prefix_cols = nn.Parameter(torch.zeros(k, h, hw, p)) if p else None

    def matrices(self) -> torch.Tensor:
        """The per-domain bias matrices ``(K, heads, N, N)``.

        Without autograd (inference) the expanded matrices are cached until a parameter changes.
        """
        if self.form == "full":
            return self.table
        if torch.is_grad_enabled():
            return self._expand()
        return self._expanded.get(list(self.parameters()), self._expand, torch.is_inference_mode_enabled())

    def _expand(self) -> torch.Tensor:
        patch = self.table[:, :, self.rel_index]                            # (K, h, HW, HW)
        if self.prefix_rows is None:
            return patch
        lower = torch.cat([self.prefix_cols, patch], dim=-1)                # (K, h, HW, N)
        return torch.cat([self.prefix_rows, lower], dim=-2)                 # (K, h, N, N)

    def forward(self, probs: torch.Tensor) -> torch.Tensor:
        """``probs`` ``(B, K)`` -> ``B_d`` ``(B, heads, N, N)``."""
        return torch.einsum("bk,khij->bhij", probs, self.matrices())


class DCRMBlock(PeftModule):
    """A frozen timm ViT block run with DCRM's per-image corrections (RMB on Q/V, DAB on the logits).

    ``forward(x, context)`` reads this adapter's :class:`DCRMRouting` from ``context`` and computes::

        h = norm1(x);  qkv = RMB(qkv(h), h, synth)                 (K slice untouched)
        x = x + drop_path1(ls1(proj(softmax(q k^T / sqrt(d_k) + B_d) v)))
        x = x + drop_path2(ls2(mlp(norm2(x))))

    with the block's own frozen modules, i.e. timm's ``Block`` / ``Attention`` forward with the two
    corrections added.

    Args:
        block: the frozen timm ``Block``.
        rmb: the block's :class:`ResidualModulation` (``None``: ablation w/o RMB).
        bias: the block's :class:`DomainAwareBias` (``None``: ablation w/o DAB).
    """

    wraps = ("block",)
    takes_context = True

    def __init__(self, block: nn.Module, rmb: ResidualModulation | None, bias: DomainAwareBias | None) -> None:
        super().__init__()
        self.block, self.rmb, self.bias = block, rmb, bias

    def no_weight_decay(self) -> set[str]:
        return {n for n, _ in self.own_parameters() if n.startswith("bias.") or n.endswith(("coef_down", "coef_up"))}

    def attention(self, h: torch.Tensor, routing: DCRMRouting) -> torch.Tensor:
        attn = self.block.attn
        b, n, _ = h.shape
        qkv = attn.qkv(h)
        if self.rmb is not None:
            qkv = self.rmb(qkv, h, routing.synth)
        heads = attn.num_heads
        q, k, v = qkv.reshape(b, n, 3, heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = attn.q_norm(q), attn.k_norm(k)
        mask = None
        if self.bias is not None:
            if n != self.bias.num_tokens:
                raise PeftError(f"DAB was built for {self.bias.num_tokens} tokens but got {n}; the input size differs "
                                "from the backbone's image_size.")
            mask = self.bias(routing.domain_probs.to(h.dtype)).to(h.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                             dropout_p=attn.attn_drop.p if self.training else 0.0)
        out = out.transpose(1, 2).reshape(b, n, -1)
        out = getattr(attn, "norm", nn.Identity())(out)
        if getattr(attn, "gate", None) is not None:
            out = out * attn.gate(h).sigmoid()
        return attn.proj_drop(attn.proj(out))

    def forward(self, x: torch.Tensor, context: dict | None = None) -> torch.Tensor:
        routing = (context or {}).get(self.adapter_name)
        if routing is None:
            raise PeftError("A DCRM block ran without routing: run the backbone through encode() (or the network), "
                            "which computes D(x) at route_from_block and passes it on; not a single block.")
        blk = self.block
        x = x + blk.drop_path1(blk.ls1(self.attention(blk.norm1(x), routing)))
        return x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))


# ---------------------------------------------------------------------------------------------- DR + PSN


class DomainRouter(nn.Module):
    """DALer + gating channel + domain classifier.

    ``a = e + Expand(GELU(Contract(e)))``, ``g = max_{hw} sigmoid(Conv1x1(grid))``,
    ``logits = Linear([a, g])``.

    Args:
        width: ``d``.
        num_domains: ``K``.
        hidden: contraction width ``d_r``.
        gate_channels: output channels of the 1x1 gating convolution.
    """

    def __init__(self, width: int, num_domains: int, hidden: int, gate_channels: int) -> None:
        super().__init__()
        self.contract = nn.Linear(width, hidden)
        self.act = nn.GELU()
        self.expand = nn.Linear(hidden, width)
        self.gate = nn.Conv2d(width, gate_channels, kernel_size=1)
        self.classifier = nn.Linear(width + gate_channels, num_domains)

    def forward(self, embedding: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        """``embedding`` ``(B, d)``, ``grid`` ``(B, d, H, W)`` -> domain logits ``(B, K)``."""
        a = embedding + self.expand(self.act(self.contract(embedding)))
        g = torch.sigmoid(self.gate(grid)).amax(dim=(2, 3))
        return self.classifier(torch.cat([a, g], dim=1))


class ParameterSynthesis(nn.Module):
    """PSN: ``theta(x) = FC2(GELU(FC1([e, D(x)])))``, ``FC2`` zero-initialised.

    Args:
        in_features: ``d + K``.
        bottleneck: hidden width (the paper uses 120).
        out_features: total number of synthesised numbers (sum of the TALers' ``synth_size``).
    """

    def __init__(self, in_features: int, bottleneck: int, out_features: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, bottleneck)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(bottleneck, out_features)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, embedding: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(torch.cat([embedding, probs.to(embedding.dtype)], dim=1))))


class DCRMController(PeftModule):
    """Routing and synthesis, run once per forward pass on the output of block ``route_from_block``.

    A router of the backbone (``backbone.routers``): :meth:`FrozenBackbone.encode` calls it after block
    ``route_from_block`` and hands its :class:`DCRMRouting` to the later blocks. Holds the router, the PSN
    and the learnable inner-loop learning rate of the bi-level trainer (``inner_lr = exp(log_inner_lr)``).
    """

    def __init__(self, config: DCRMConfig, width: int, grid: tuple[int, int], num_prefix_tokens: int,
                 talers: dict[str, TALer], route_from_block: int) -> None:
        super().__init__()
        self.num_domains, self.width = int(config.num_domains), int(width)
        self.grid, self.num_prefix_tokens = tuple(grid), int(num_prefix_tokens)
        self.route_from_block = int(route_from_block)
        self.router = (DomainRouter(width, config.num_domains, config.router_hidden or max(16, width // 8),
                                    config.gate_channels) if config.use_router else None)
        self.layout: list[tuple[str, int, int]] = []
        start = 0
        for key, taler in talers.items():
            self.layout.append((key, start, taler.synth_size))
            start += taler.synth_size
        self.psn = (ParameterSynthesis(width + config.num_domains, config.bottleneck, start)
                    if config.use_psn and talers else None)
        self.log_inner_lr = nn.Parameter(torch.tensor(math.log(config.inner_lr)))

    @property
    def inner_lr(self) -> torch.Tensor:
        return self.log_inner_lr.exp()

    def no_weight_decay(self) -> set[str]:
        return {"log_inner_lr"}

    def embed(self, tokens: torch.Tensor, with_grid: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Block-k tokens ``(B, P + H*W, d)`` -> image embedding ``(B, d)`` and grid ``(B, d, H, W)``."""
        gh, gw = self.grid
        if tokens.shape[1] != self.num_prefix_tokens + gh * gw:
            raise PeftError(f"DCRM router expects {self.num_prefix_tokens} prefix + {gh}x{gw} patch tokens, got "
                            f"{tokens.shape[1]}; the input size differs from the backbone's image_size.")
        patches = tokens[:, self.num_prefix_tokens:]
        embedding = F.layer_norm(patches.mean(dim=1), (self.width,))
        if not with_grid:
            return embedding, None
        grid = F.layer_norm(patches, (self.width,)).transpose(1, 2).reshape(tokens.shape[0], self.width, gh, gw)
        return embedding, grid

    def synthesize(self, embedding: torch.Tensor, probs: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-image TALer deltas ``{key: (B, synth_size)}`` for an embedding and domain probabilities."""
        if self.psn is None:
            return {}
        out = self.psn(embedding, probs)
        return {key: out[:, s:s + n] for key, s, n in self.layout}

    def forward(self, tokens: torch.Tensor) -> DCRMRouting:
        """``D(x)`` and the synthesised parameters of this batch from block ``route_from_block``'s output."""
        embedding, grid = self.embed(tokens, with_grid=self.router is not None)
        logits = None
        if self.router is not None:
            logits = self.router(embedding, grid)
            probs = torch.softmax(logits.float(), dim=1).to(tokens.dtype)
        else:
            probs = tokens.new_full((tokens.shape[0], self.num_domains), 1.0 / self.num_domains)
        if self.psn is None:
            return DCRMRouting(logits, probs, embedding, None, tokens.new_zeros((), dtype=torch.float32))
        out = self.psn(embedding, probs)
        synth = {key: out[:, s:s + n] for key, s, n in self.layout}
        return DCRMRouting(logits, probs, embedding, synth, out.float().pow(2).mean())


def find_controller(model: nn.Module) -> DCRMController:
    """The (first) :class:`DCRMController` inside a network (raises if the network carries no DCRM)."""
    for m in model.modules():
        if isinstance(m, DCRMController):
            return m
    raise PeftError(f"{type(model).__name__} carries no DCRM modules; build it with peft={{'method': 'dcrm'}}.")


# ---------------------------------------------------------------------------------------------- config


@register_method
@dataclass
class DCRMConfig(PeftConfig):
    """DCRM-ViT on a frozen ViT.

    Args:
        num_domains: ``K >= 2`` domains the router tells apart (e.g. 2: medical/natural, or medical
            sub-domains).
        rank: ``d'``, bottleneck of every TALer.
        bank_size: ``M`` low-rank bases per TALer projection that the PSN mixes per image.
        bottleneck: hidden width of the PSN (paper: 120).
        router_hidden: DALer contraction width (``None``: ``max(16, d // 8)``).
        gate_channels: channels of the router's 1x1 gating convolution.
        targets: which projections get a TALer, a subset of ``"qv"`` (K is never modulated).
        rescale: initial ``r``.
        learn_rescale: train ``r`` (else fixed at ``rescale``).
        dab_form: ``"relative"`` or ``"full"`` (see the module docstring).
        inner_lr: initial inner-loop learning rate ``alpha`` of the bi-level trainer (meta-learned).
        use_rmb, use_router, use_psn, use_dab, use_rescale: ablation switches (paper Table 6).
        route_from_block: ``k``, the block whose output the router reads (negative counts from the end;
            ``None``: mid-depth, ``(depth - 1) // 2``). Only blocks after ``k`` are modulated.
        blocks: blocks that get RMB and DAB (``None``: every block after ``k``).
    """

    method: ClassVar[str] = "dcrm"
    num_domains: int = 2
    rank: int = 8
    bank_size: int = 4
    bottleneck: int = 120
    router_hidden: int | None = None
    gate_channels: int = 32
    targets: str = "qv"
    rescale: float = 1.0
    learn_rescale: bool = True
    dab_form: str = "relative"
    inner_lr: float = 0.01
    use_rmb: bool = True
    use_router: bool = True
    use_psn: bool = True
    use_dab: bool = True
    use_rescale: bool = True
    route_from_block: int | None = None

    def routing_block(self, num_blocks: int) -> int:
        """``k`` resolved for a backbone with ``num_blocks`` blocks."""
        if self.route_from_block is None:
            return (num_blocks - 1) // 2
        k = int(self.route_from_block)
        if not -num_blocks <= k < num_blocks - 1 or k % num_blocks == num_blocks - 1:
            raise PeftError(f"route_from_block={k} must leave at least one block to modulate: the backbone has "
                            f"{num_blocks} blocks, so use 0..{num_blocks - 2}.")
        return k % num_blocks

    def _check(self, backbone: FrozenBackbone, idx: list[int]) -> None:
        if backbone.family != "vit" or any(backbone.blocks[i].token_format != "nlc" for i in idx):
            raise PeftError(f"DCRM needs a ViT-family backbone with (B, N, C) tokens; {backbone.name} is "
                            f"{backbone.family!r}.")
        if int(self.num_domains) < 2:
            raise PeftError(f"num_domains must be >= 2 (the router mixes domains), got {self.num_domains}.")
        for name in ("rank", "bank_size", "bottleneck", "gate_channels"):
            if int(getattr(self, name)) < 1:
                raise PeftError(f"{name} must be >= 1, got {getattr(self, name)}.")
        if not self.targets or not set(self.targets) <= {"q", "v"}:
            raise PeftError(f"targets must be letters from 'qv' (K stays frozen in DCRM), got {self.targets!r}.")
        if self.dab_form not in DAB_FORMS:
            raise PeftError(f"dab_form must be one of {DAB_FORMS}, got {self.dab_form!r}.")
        if not self.inner_lr > 0:
            raise PeftError(f"inner_lr must be > 0, got {self.inner_lr}.")
        for i in idx:
            block = unwrap(backbone.block_module(i))
            attn = getattr(block, "attn", None)
            if type(block).__name__ != "Block" or type(attn).__name__ != "Attention" or \
                    not isinstance(unwrap(getattr(attn, "qkv", None)), nn.Linear):
                raise PeftError(f"Block {i} of {backbone.name} is not a timm ViT pre-norm Block with a fused-qkv "
                                "Attention; DCRM supports timm VisionTransformer blocks.")
            if backbone.model.get_submodule(backbone.blocks[i].name) is not block:
                raise PeftError(f"Block {i} of {backbone.name} is already wrapped by another adapter; apply DCRM "
                                "before adapters that wrap whole blocks (e.g. DKA, VPT).")

    def inject(self, backbone: FrozenBackbone) -> None:
        n = len(backbone.blocks)
        k = self.routing_block(n)
        idx = list(range(k + 1, n)) if self.blocks is None else select_blocks(backbone, self.blocks)
        early = [i for i in idx if i <= k]
        if early:
            raise PeftError(f"Blocks {early} run before the router (route_from_block={k}) and cannot be modulated; "
                            f"select blocks after {k} or route from an earlier block.")
        self._check(backbone, idx)
        talers: dict[str, TALer] = {}
        for i in idx:
            info = backbone.blocks[i]
            block = unwrap(backbone.block_module(i))
            rmb = bias = None
            if self.use_rmb:
                parts = {p: TALer(info.width, self.rank, self.bank_size, self.rescale, self.use_rescale,
                                  self.learn_rescale) for p in "qv" if p in self.targets}
                keys = {p: f"blocks.{i}.{p}" for p in parts}
                talers.update({keys[p]: t for p, t in parts.items()})
                rmb = ResidualModulation(parts, keys)
            if self.use_dab:
                bias = DomainAwareBias(self.num_domains, block.attn.num_heads, info.grid, info.num_prefix_tokens,
                                       self.dab_form)
            replace_module(backbone.model, info.name, DCRMBlock(block, rmb, bias))
        route = backbone.blocks[k]
        key = next(f"dcrm{j or ''}" for j in range(len(backbone.routers) + 1)
                   if f"dcrm{j or ''}" not in backbone.routers)
        backbone.routers[key] = DCRMController(self, route.width, route.grid, route.num_prefix_tokens, talers, k)


# ---------------------------------------------------------------------------------------------- cost


def psn_flops(width: int, num_domains: int, num_targets: int, rank: int = 8, bank_size: int = 4,
              bottleneck: int = 120, use_rescale: bool = True) -> dict[str, int]:
    """Analytic per-image FLOPs (multiply-add = 2) and parameters of the parameter synthesis.

    ``mlp``: the two PSN layers; ``materialise``: forming ``W_DS(x)``, ``W_US(x)`` from the bank for
    ``num_targets`` TALers (2 per block with Q and V). Element-wise operations (GELU, bias adds) are
    not counted, as in ``torch.utils.flop_counter``. Returns ``{"mlp", "materialise", "total",
    "params", "synth_size"}``.
    """
    synth = num_targets * (2 * bank_size + rank + width + (1 if use_rescale else 0))
    fan_in = width + num_domains
    mlp = 2 * fan_in * bottleneck + 2 * bottleneck * synth
    materialise = num_targets * 2 * (2 * bank_size * rank * width)
    params = fan_in * bottleneck + bottleneck + bottleneck * synth + synth
    return {"mlp": mlp, "materialise": materialise, "total": mlp + materialise, "params": params,
            "synth_size": synth}


def router_flops(width: int, num_domains: int, grid: tuple[int, int], hidden: int, gate_channels: int) -> int:
    """Analytic per-image FLOPs of the domain router (multiply-add = 2; pooling/LayerNorm not counted)."""
    hw = int(grid[0]) * int(grid[1])
    return 2 * (width * hidden + hidden * width + hw * width * gate_channels + (width + gate_channels) * num_domains)
