"""E SwiGLU experts stored as stacked weights and computed for all experts at once.

N routed rows (tokens x slots, sorted by expert), D model dim, H expert hidden dim, E experts,
M merged experts (IoE segments), L rows per merged expert.

Two exact paths compute the expert-sorted rows (they agree to fp32 rounding, see tests):
- "grouped": torch._grouped_mm over all experts (one call for gate+up, one for down).
- "loop": one plain matmul per expert on its contiguous slice of the sorted rows (a loop over E
  experts, never over tokens). It needs the per-expert counts on the host (a sync); under
  torch.compile it runs as one custom op (`expert_loop`), so the sync breaks no graph.

`_grouped_mm` is only fast where PyTorch has a grouped-GEMM kernel: CUDA SM90/SM100 (H100, B200)
in bf16, and ROCm gfx942/gfx950 (MI300, MI350) built with CK. Everywhere else on a GPU (A100,
MI250X = gfx90a) it falls back to a host sync plus one matmul per group, i.e. "loop" in disguise.
gfx90a reports device capability (9, 0), so a `capability >= (9, 0)` test would wrongly pick it
on MI250X: `expert_path` checks the ROCm arch name before the CUDA capability. On CPU the
fallback's host sync costs nothing and "grouped" still beat "loop" fwd+bwd (by 3% in bf16, 12%
in fp32 on a 2-core Xeon; benchmarks/bench_moe.py, numbers in docs/MOE.md). Under torch.compile
only bf16 can take "grouped" (the op's meta kernel rejects other dtypes).

Where `benchmarks/gpu_check.py` finds "grouped" wrong on a device (its bf16 parity against
"loop" and a float64 reference fails, or an expert with no tokens gets a non-zero weight
gradient), that device goes into `GROUPED_MM_FAILURES` and "auto" takes "loop" there.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

# ROCm archs with a CK grouped-GEMM kernel behind torch._grouped_mm.
_ROCM_GROUPED_ARCHS = ("gfx942", "gfx950")
# torch._grouped_mm has a CPU kernel from torch 2.9 (2.8 raises NotImplementedError on CPU).
_TORCH_MINOR = tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2])  # (2, 13)
_CPU_GROUPED = _TORCH_MINOR >= (2, 9)
# Its kernels need 16-byte-aligned row strides: D and H multiples of 8 cover fp32 and bf16.
_ALIGN = 8
# (device-name substring, torch "major.minor" or "" for any) where gpu_check.py's parity of
# torch._grouped_mm failed: "auto" never picks "grouped" there. Add an entry only with the run's
# numbers in docs/GPU.md (gpu_check.py prints the entry to add). None measured yet.
GROUPED_MM_FAILURES: tuple[tuple[str, str], ...] = ()


def grouped_mm_failed(device: torch.device) -> bool:
    """Whether `GROUPED_MM_FAILURES` lists this device with this torch."""
    if not GROUPED_MM_FAILURES:  # no device query (nothing for torch.compile to trace) until one is listed
        return False
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    torch_minor = ".".join(map(str, _TORCH_MINOR))
    return any(part in name and version in ("", torch_minor) for part, version in GROUPED_MM_FAILURES)


def expert_path(device: torch.device, dtype: torch.dtype) -> str:
    """The faster exact expert path on `device` for `dtype`: "grouped" or "loop" (see module doc)."""
    if not hasattr(torch, "_grouped_mm") or grouped_mm_failed(device):  # torch < 2.8, or found wrong
        return "loop"
    if dtype != torch.bfloat16 and torch.compiler.is_compiling():
        return "loop"  # torch 2.13's meta kernel for _grouped_mm (used while tracing) takes bf16 only
    if device.type == "cpu":
        return "grouped" if _CPU_GROUPED else "loop"  # measured faster fwd+bwd than "loop" (docs/MOE.md)
    if device.type != "cuda" or dtype != torch.bfloat16:
        return "loop"  # the grouped kernels are bf16-only; other dtypes take the per-group fallback
    if torch.version.hip is not None:
        arch = torch.cuda.get_device_properties(device).gcnArchName.split(":")[0]
        return "grouped" if arch in _ROCM_GROUPED_ARCHS else "loop"
    major, _ = torch.cuda.get_device_capability(device)
    return "grouped" if major in (9, 10) else "loop"


def swiglu(gate_up: Tensor) -> Tensor:
    """silu(gate) * up for a fused [..., 2H] projection, as Qwen's MLP. Returns [..., H]."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


class Experts(nn.Module):
    """E SwiGLU FFNs, out = (silu(x Wg_e) * (x Wu_e)) Wd_e, with [Wg_e | Wu_e] fused."""

    def __init__(self, num_experts: int, dim: int, hidden_dim: int, path: str = "auto",
                 init_scale: float = 1.0, identical: bool = False) -> None:  # fmt: skip
        super().__init__()
        self.num_experts = num_experts
        self.path = path  # "auto" | "grouped" | "loop"
        self.init_scale = init_scale  # init std = std * init_scale (the router's rule: Router.expert_init_scale)
        self.identical = identical  # init: every expert a copy of expert 0's draw (MoEConfig.ioe_expert_init)
        self.w_gate_up = nn.Parameter(torch.empty(num_experts, dim, 2 * hidden_dim))  # [E, D, 2H]
        self.w_down = nn.Parameter(torch.empty(num_experts, hidden_dim, dim))  # [E, H, D]

    def init_params(self, std: float) -> None:
        for w in (self.w_gate_up, self.w_down):
            nn.init.normal_(w, std=std * self.init_scale)
            if self.identical:
                # Copied from the parameter itself, not from a fresh [D, 2H] draw: a sharded
                # parameter (FSDP, possibly along D or H) then still holds one expert on all ranks.
                with torch.no_grad():
                    w.copy_(w[:1].clone().expand_as(w))

    def forward(self, x: Tensor, counts: Tensor) -> Tensor:
        """Run rows sorted by expert through their experts.

        x: [N, D] rows grouped by expert (expert 0's rows first); counts: [E] rows per expert.
        Returns [N, D].
        """
        path = self.path
        if path == "auto":
            aligned = x.shape[1] % _ALIGN == 0 and self.w_down.shape[1] % _ALIGN == 0
            path = expert_path(x.device, x.dtype) if aligned else "loop"
        if path == "grouped":
            offs = counts.cumsum(0).to(torch.int32)  # [E] end row of each expert's group
            h = swiglu(torch._grouped_mm(x, self.w_gate_up, offs=offs))  # [N, H]
            return torch._grouped_mm(h, self.w_down, offs=offs)  # [N, D]
        if torch.compiler.is_compiling():  # the host sync inside one opaque op: no graph break
            return expert_loop(x, self.w_gate_up, self.w_down, counts)[0]
        chunks = x.split(counts.tolist())  # host sync
        out = [swiglu(xe @ self.w_gate_up[e]) @ self.w_down[e] for e, xe in enumerate(chunks)]
        return torch.cat(out)  # [N, D]

    def merged_swiglu(self, x: Tensor, weights: Tensor, chunk: int) -> Tensor:
        """Each group of rows through its own merged expert W_m = sum_e weights[m, e] W_e.

        For routers that mix parameters (IoE). x: [M, L, D] (M groups of L rows), weights: [M, E].
        Returns [M, L, D]. The M merged experts (3DH weights each) are never all in memory nor
        kept for backward: `chunk` groups are merged at a time and re-merged in backward.
        """
        return _MergedSwiGLU.apply(x, weights, self.w_gate_up, self.w_down, chunk)


@torch.library.custom_op("ioe_train::expert_loop", mutates_args=())
def expert_loop(x: Tensor, w_gate_up: Tensor, w_down: Tensor, counts: Tensor) -> tuple[Tensor, Tensor]:
    """The "loop" path as one op that torch.compile does not trace into: its per-expert slices
    need `counts` on the host, a graph break that under activation checkpointing would leave the
    whole block eager. x: [N, D] sorted by expert, counts: [E]. Returns (out [N, D], the gate/up
    projection [N, 2H], kept for backward)."""
    sizes = counts.tolist()  # host sync
    gate_up = torch.cat([xe @ w_gate_up[e] for e, xe in enumerate(x.split(sizes))])  # [N, 2H]
    out = torch.cat([he @ w_down[e] for e, he in enumerate(swiglu(gate_up).split(sizes))])  # [N, D]
    return out, gate_up


@expert_loop.register_fake
def _(x: Tensor, w_gate_up: Tensor, w_down: Tensor, counts: Tensor) -> tuple[Tensor, Tensor]:
    return x.new_empty(x.shape[0], w_down.shape[2]), x.new_empty(x.shape[0], w_gate_up.shape[2])


@torch.library.custom_op("ioe_train::expert_loop_backward", mutates_args=())
def expert_loop_backward(grad_out: Tensor, x: Tensor, gate_up: Tensor, w_gate_up: Tensor, w_down: Tensor,
                         counts: Tensor) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """Gradients of `expert_loop` (x, w_gate_up, w_down), expert by expert; an expert without
    rows gets zero gradients."""
    sizes = counts.tolist()  # host sync
    gate, up = gate_up.chunk(2, dim=-1)  # [N, H] each
    sig = torch.sigmoid(gate)
    act = gate * sig  # silu(gate)
    grad_x, grad_gu, grad_d = torch.empty_like(x), torch.zeros_like(w_gate_up), torch.zeros_like(w_down)
    a = 0
    for e, n in enumerate(sizes):
        rows = slice(a, a + n)
        a += n
        if n == 0:
            continue
        dy, h = grad_out[rows], act[rows] * up[rows]  # [n, D], [n, H]
        grad_d[e] = h.t() @ dy  # [H, D]
        dh = dy @ w_down[e].t()  # [n, H]
        # h = silu(gate) * up; silu'(z) = sig(z) * (1 + z * (1 - sig(z)))
        d_gate_up = torch.cat([dh * up[rows] * sig[rows] * (1 + gate[rows] * (1 - sig[rows])), dh * act[rows]], -1)
        grad_gu[e] = x[rows].t() @ d_gate_up  # [D, 2H]
        grad_x[rows] = d_gate_up @ w_gate_up[e].t()  # [n, D]
    return grad_x, grad_gu, grad_d


@expert_loop_backward.register_fake
def _(grad_out, x, gate_up, w_gate_up, w_down, counts):
    return torch.empty_like(x), torch.empty_like(w_gate_up), torch.empty_like(w_down)


def _expert_loop_setup(ctx, inputs, output) -> None:
    x, w_gate_up, w_down, counts = inputs
    ctx.save_for_backward(x, output[1], w_gate_up, w_down, counts)


def _expert_loop_grad(ctx, grad_out: Tensor, grad_gate_up: Tensor):
    grads = expert_loop_backward(grad_out, *ctx.saved_tensors)
    return *grads, None


expert_loop.register_autograd(_expert_loop_grad, setup_context=_expert_loop_setup)


class _MergedSwiGLU(torch.autograd.Function):
    """y_m = swiglu(x_m Wgu_m) Wd_m with Wgu_m = sum_e g_me Wgu_e and Wd_m = sum_e g_me Wd_e.

    Autograd through `einsum` + `bmm` would save every merged expert for backward (M x 3DH: ~3.3
    GB per layer at B 4, S 2048, L 64, D 896, H 4864 in bf16). Here forward saves only x, g and
    the expert weights; backward re-merges each chunk and recomputes its gate/up projection (one
    extra [L, D] x [D, 2H] matmul per group), then reduces the merged experts' gradients onto the
    E experts (dW_e = sum_m g_me dW_m) and the merge weights (dg_me = <dW_m, W_e>).
    """

    @staticmethod
    def forward(ctx, x: Tensor, g: Tensor, w_gate_up: Tensor, w_down: Tensor, chunk: int) -> Tensor:
        out = torch.empty_like(x)  # [M, L, D]
        for a in range(0, x.shape[0], chunk):
            gc = g[a : a + chunk].to(w_gate_up.dtype)  # [m, E]
            gate_up = torch.bmm(x[a : a + chunk], torch.einsum("me,edh->mdh", gc, w_gate_up))  # [m, L, 2H]
            w_d = torch.einsum("me,ehd->mhd", gc, w_down)  # [m, H, D]
            torch.bmm(swiglu(gate_up), w_d, out=out[a : a + chunk])
        ctx.save_for_backward(x, g, w_gate_up, w_down)
        ctx.chunk = chunk
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        x, g, w_gate_up, w_down = ctx.saved_tensors
        want_x, want_g, want_gu, want_d = ctx.needs_input_grad[:4]
        dtype = w_gate_up.dtype
        grad_x = torch.empty_like(x) if want_x else None  # [M, L, D]
        # Summed over chunks in at least fp32 (bf16 partial sums would round once per chunk).
        acc = torch.promote_types(dtype, torch.float32)
        grad_g = torch.empty(g.shape, dtype=acc, device=g.device) if want_g else None  # [M, E]
        grad_gu = torch.zeros(w_gate_up.shape, dtype=acc, device=x.device) if want_gu else None
        grad_d = torch.zeros(w_down.shape, dtype=acc, device=x.device) if want_d else None
        for a in range(0, x.shape[0], ctx.chunk):
            b = a + ctx.chunk
            xc, gc, dy = x[a:b], g[a:b].to(dtype), grad_out[a:b].to(dtype)  # [m, L, D], [m, E], [m, L, D]
            w_gu = torch.einsum("me,edh->mdh", gc, w_gate_up)  # [m, D, 2H]
            w_d = torch.einsum("me,ehd->mhd", gc, w_down)  # [m, H, D]
            gate, up = torch.bmm(xc, w_gu).chunk(2, dim=-1)  # [m, L, H] each
            sig = torch.sigmoid(gate)
            act = gate * sig  # silu(gate)
            d_w_d = torch.bmm((act * up).transpose(1, 2), dy)  # [m, H, D]
            dh = torch.bmm(dy, w_d.transpose(1, 2))  # [m, L, H]
            # h = silu(gate) * up; silu'(z) = sig(z) * (1 + z * (1 - sig(z)))
            d_gate_up = torch.cat([dh * up * sig * (1 + gate * (1 - sig)), dh * act], dim=-1)  # [m, L, 2H]
            d_w_gu = torch.bmm(xc.transpose(1, 2), d_gate_up)  # [m, D, 2H]
            if want_x:
                torch.bmm(d_gate_up, w_gu.transpose(1, 2), out=grad_x[a:b])
            if want_g:
                grad_g[a:b] = (torch.einsum("mdh,edh->me", d_w_gu, w_gate_up)
                               + torch.einsum("mhd,ehd->me", d_w_d, w_down))  # fmt: skip
            if want_gu:
                grad_gu += torch.einsum("me,mdh->edh", gc, d_w_gu)
            if want_d:
                grad_d += torch.einsum("me,mhd->ehd", gc, d_w_d)
        return (grad_x, grad_g.to(g.dtype) if want_g else None, grad_gu.to(dtype) if want_gu else None,
                grad_d.to(dtype) if want_d else None, None)  # fmt: skip
