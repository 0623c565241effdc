"""Routing diagnostics: does a trained MoE model use its routing? (docs/MOE.md, "Routing diagnostics")

On held-out windows, `routing_diagnostics` measures the loss with routing as trained and under two
interventions (`Router`: "uniform" routing that ignores the input, "shuffle" decisions permuted
across the batch), and per MoE layer, over routed items only, the mutual information between an
item's source (pile_set_name) and its experts, the routing entropy and the load. Items are tokens
(top-k) or segments (IoE); "routed" leaves out IoE segments that take the learned prior.

B batch, S sequence length, E experts, M items per sequence, J experts per item, N sources.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ioe_train.data import EvalSet
from ioe_train.evaluate import loss_sums, losses_from_sums
from ioe_train.loss import per_source_sums
from ioe_train.moe import ROUTING_OVERRIDES, MoE, Router, Routing


@dataclass
class Intervention:
    """The loss under one routing override."""

    loss: float  # mean per label token
    delta: float  # loss - the loss with routing as trained (> 0: the routing was worth that much)


@dataclass
class LayerRouting:
    """Routing of one MoE layer over its routed items (`Routing.routed`) in the evaluated windows."""

    layer: int  # index among the model's MoE layers
    items: int  # routed items (top-k: tokens; IoE: segments routed by their predecessor)
    entropy: float  # mean entropy of the router's distribution (top-k: softmax over E; IoE: g), nats
    weight_entropy: float  # mean entropy of the applied weights scaled to sum 1 (top-k: the K gate weights; IoE: g)
    max_share: float  # the largest expert's share of the routed load (1/E: balanced)
    load_entropy: float  # entropy of the routed load over the experts, H(expert), nats
    mi_items: int  # routed items whose label tokens all come from one source
    source_entropy: float  # H(source) over those items, nats
    mutual_information: float  # I(source; expert) over those items, nats
    mi_fraction: float  # mutual_information / source_entropy: 1 = the experts identify the source


@dataclass
class RoutingDiagnostics:
    """What `routing_diagnostics` measured."""

    router: str  # MoEConfig.router
    num_experts: int  # E
    span: int  # tokens per item: 1 (top-k) or the IoE segment length L
    experts_per_item: int  # J: K (top-k) or E (IoE)
    losses: dict[str, float]  # routing as trained: "val/loss" and "val/loss/<source>" (`ioe-train eval`'s keys)
    interventions: dict[str, Intervention]  # by override: "uniform", "shuffle"
    layers: list[LayerRouting]


@dataclass
class TrainValGap:
    """The last logged training loss against the last validation loss of a run."""

    train_loss: float  # loss/ce of the last logged step: that step's training batches
    train_step: int
    val_loss: float  # val/loss of the last evaluation
    val_step: int
    gap: float  # val_loss - train_loss


def routers(model: nn.Module) -> list[Router]:
    """The routers of `model`'s MoE layers, in layer order."""
    return [m.router for m in model.modules() if isinstance(m, MoE)]


@contextmanager
def routing_override(model: nn.Module, override: str | None) -> Iterator[None]:
    """Inside the block every router of `model` routes with `override` (None: as trained; else one of
    ROUTING_OVERRIDES, see `Router`); afterwards each has its previous setting again."""
    if override is not None and override not in ROUTING_OVERRIDES:
        raise ValueError(f"override must be None or one of {ROUTING_OVERRIDES}, got {override!r}")
    layers = routers(model)
    previous = [r.routing_override for r in layers]
    for r in layers:
        r.routing_override = override
    try:
        yield
    finally:
        for r, p in zip(layers, previous):
            r.routing_override = p


@contextmanager
def recorded_routing(model: nn.Module) -> Iterator[list[Routing]]:
    """Inside the block each router call of `model` appends its `Routed.routing` to the list yielded
    (a forward adds one per MoE layer, in layer order); forward hooks, removed afterwards."""
    records: list[Routing] = []
    handles = [r.register_forward_hook(lambda module, args, routed: records.append(routed.routing))
               for r in routers(model)]  # fmt: skip
    try:
        yield records
    finally:
        for h in handles:
            h.remove()


def item_sources(source_ids: Tensor, span: int, items: int) -> Tensor:
    """source_ids [B, S] (each position's label token) -> [B, M] the source of each item's label
    tokens, or -1 where they come from more than one source."""
    b, s = source_ids.shape
    padded = F.pad(source_ids, (0, items * span - s), value=-1).view(b, items, span)  # [B, M, span]
    first = padded[..., 0]  # [B, M]
    one = ((padded == first[..., None]) | (padded < 0)).all(dim=-1)  # [B, M], the padding ignored
    return torch.where(one, first, -1)


def _entropy(p: Tensor) -> float:
    """Entropy in nats of the distribution p (any shape) scaled to sum 1; 0 for an empty one."""
    total = p.sum()
    return torch.special.entr(p / total).sum().item() if total > 0 else 0.0


def mutual_information(joint: Tensor) -> float:
    """I(source; expert) in nats of a table of counts [N, E]: H(source) + H(expert) - H(source, expert)
    (clamped at 0: for independent rows the sum is 0 up to rounding)."""
    return max(0.0, _entropy(joint.sum(dim=1)) + _entropy(joint.sum(dim=0)) - _entropy(joint))


class _LayerSums:
    """Running sums of one layer's routing statistics over the evaluated batches."""

    def __init__(self, num_sources: int, num_experts: int) -> None:
        self.joint = torch.zeros(num_sources, num_experts, dtype=torch.float64)  # shares by source
        self.load = torch.zeros(num_experts, dtype=torch.float64)  # [E] shares of the routed items
        self.items = 0
        self.mi_items = 0
        self.entropy = 0.0  # sums over the routed items
        self.weight_entropy = 0.0

    def add(self, routing: Routing, source_ids: Tensor) -> None:
        """One forward's routing of this layer; source_ids [B, S]."""
        probs, indices, weights = routing.probs.float(), routing.indices, routing.weights.float()
        b, m, e = probs.shape
        shares = torch.zeros(b, m, e, device=probs.device).scatter_add_(-1, indices, routing.share.float())  # [B, M, E]
        routed = routing.routed  # [B, M]
        self.items += int(routed.sum())
        self.load += shares[routed].sum(dim=0).double().cpu()
        self.entropy += torch.special.entr(probs).sum(dim=-1)[routed].sum().item()
        scaled = weights / weights.sum(dim=-1, keepdim=True)  # [B, M, J]
        self.weight_entropy += torch.special.entr(scaled).sum(dim=-1)[routed].sum().item()

        sources = item_sources(source_ids, routing.span, m)  # [B, M]
        mine = routed & (sources >= 0)
        src, item_shares = sources[mine].cpu(), shares[mine].double().cpu()  # [R], [R, E]
        self.mi_items += len(src)
        self.joint.index_add_(0, src, item_shares)

    def result(self, layer: int) -> LayerRouting:
        source_entropy = _entropy(self.joint.sum(dim=1))
        mi = mutual_information(self.joint)
        return LayerRouting(
            layer=layer,
            items=self.items,
            entropy=self.entropy / max(self.items, 1),
            weight_entropy=self.weight_entropy / max(self.items, 1),
            max_share=(self.load.max() / self.load.sum()).item() if self.items else 0.0,
            load_entropy=_entropy(self.load),
            mi_items=self.mi_items,
            source_entropy=source_entropy,
            mutual_information=mi,
            mi_fraction=mi / source_entropy if source_entropy > 0 else 0.0,
        )


@torch.no_grad()
def routing_diagnostics(model: nn.Module, eval_set: EvalSet, batch_size: int, max_batches: int = 0,
                        device: torch.device = torch.device("cpu"), per_document: bool = False) -> RoutingDiagnostics:  # fmt: skip
    """Routing diagnostics of a MoE `model` on `eval_set` (max_batches 0: every window), every
    pass scored per document if `per_document` (Decoder.forward).

    The loss as trained comes with the routing records of the same pass; each intervention is one
    more pass over the same windows. Raises ValueError for a model without MoE layers.
    """
    moes = [m for m in model.modules() if isinstance(m, MoE)]
    if not moes:
        raise ValueError("the model has no MoE layer: there is no routing to diagnose")
    was_training = model.training
    model.eval()
    n = len(eval_set.source_names)
    layers = [_LayerSums(n, moe.cfg.num_experts) for moe in moes]
    sums = torch.zeros(n, dtype=torch.float64, device=device)
    counts = torch.zeros(n, dtype=torch.float64, device=device)
    span = per_item = 0
    with routing_override(model, None), recorded_routing(model) as records:
        for batch in eval_set.batches(batch_size, max_batches):
            records.clear()
            source_ids = batch["source_ids"].to(device)  # [B, S]
            losses, _, _ = model(batch["input_ids"].to(device), batch["labels"].to(device), reduction="none",
                                 per_document=per_document)  # [B, S]
            s, c = per_source_sums(losses, source_ids, n)
            sums += s
            counts += c
            for stats, routing in zip(layers, records, strict=True):
                stats.add(routing, source_ids)
            span, per_item = records[0].span, records[0].indices.shape[-1]
    losses = losses_from_sums(sums, counts, eval_set.source_names)
    interventions = {}
    for override in ROUTING_OVERRIDES:
        with routing_override(model, override):
            s, c = loss_sums(model, eval_set, batch_size, max_batches, device, per_document)
        loss = (s.sum() / c.sum().clamp(min=1)).item()
        interventions[override] = Intervention(loss, loss - losses["val/loss"])
    model.train(was_training)
    return RoutingDiagnostics(router=moes[0].cfg.router, num_experts=moes[0].cfg.num_experts, span=span,
                              experts_per_item=per_item, losses=losses, interventions=interventions,
                              layers=[stats.result(i) for i, stats in enumerate(layers)])  # fmt: skip


def train_val_gap(records: list[dict[str, Any]]) -> TrainValGap | None:
    """The last `loss/ce` and the last `val/loss` of a run's metrics.jsonl records
    (`runs.read_metrics`); None if either was never logged."""
    train = [r for r in records if "loss/ce" in r]
    val = [r for r in records if "val/loss" in r]
    if not train or not val:
        return None
    t, v = train[-1], val[-1]
    return TrainValGap(t["loss/ce"], t["step"], v["val/loss"], v["step"], v["val/loss"] - t["loss/ce"])


def format_routing(diag: RoutingDiagnostics, gap: TrainValGap | None) -> str:
    """The diagnostics as `ioe-train eval --routing` prints them, after the val losses."""
    item = "tokens" if diag.span == 1 else f"segments of {diag.span} tokens routed by their predecessor"
    lines = [f"routing: {diag.router}, {diag.num_experts} experts; statistics over routed items = {item}"]
    normal = diag.losses["val/loss"]
    lines.append(f"  loss as trained {normal:.4f}" + "".join(
        f" | {name} {i.loss:.4f} ({i.delta:+.4f})" for name, i in diag.interventions.items()))  # fmt: skip
    lines.append("  layer     items  I(source;expert)  /H(source)  entropy  weight entropy  max share")
    for r in diag.layers:
        lines.append(f"  {r.layer:>5} {r.items:>9} {r.mutual_information:>17.4f} {r.mi_fraction:>11.3f} "
                     f"{r.entropy:>8.3f} {r.weight_entropy:>15.3f} {r.max_share:>10.3f}")  # fmt: skip
    lines.append(f"  (nats; uniform entropy ln E = {math.log(diag.num_experts):.3f}, uniform weight entropy "
                 f"ln J = {math.log(diag.experts_per_item):.3f}, balanced max share 1/E = {1 / diag.num_experts:.3f}, "
                 f"H(source) = {diag.layers[0].source_entropy:.3f})")  # fmt: skip
    if gap is None:
        lines.append("train-val gap: metrics.jsonl has no loss/ce or no val/loss")
    else:
        lines.append(f"train-val gap: val loss {gap.val_loss:.4f} (step {gap.val_step}) - train loss "
                     f"{gap.train_loss:.4f} (step {gap.train_step}) = {gap.gap:+.4f}")  # fmt: skip
    return "\n".join(lines)
