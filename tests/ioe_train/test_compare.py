"""`ioe-train compare` on run directories made here (config.yaml + metrics.jsonl), and the
trainer's expert summary in metrics.jsonl."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from ioe_train.cli import main as ioe_train
from ioe_train.compare import compare_runs, run_budget, write_comparison
from ioe_train.config import load_config
from ioe_train.metrics import MetricsLogger, expert_summary
from ioe_train.runs import RunError

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def fake_run(root: Path, config: str, train: Path, val: Path, records: list[dict]) -> Path:
    out = root / config.removesuffix(".yaml")
    cfg = load_config(CONFIGS / config, [f"data.train_dirs=[{train}]", f"data.val_dirs=[{val}]", f"output_dir={out}"])
    out.mkdir(parents=True)
    (out / "config.yaml").write_text(cfg.to_yaml())
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return out


def evals(*points: tuple[int, float]) -> list[dict]:
    return [{"step": t // 1024, "tokens": t, "val/loss": v, "val/loss/domain_00": v + 0.1,
             "val/loss/domain_01": v - 0.1} for t, v in points]  # fmt: skip


def speeds(*points: tuple[int, float]) -> list[dict]:
    return [{"step": t // 1024, "tokens": t, "loss/total": 3.0, "tokens_per_s": s} for t, s in points]


def experts(tokens: int, share: float, entropy: float) -> dict:
    return {"step": tokens // 1024, "tokens": tokens, "experts/max_share": share, "experts/entropy": entropy}


@pytest.fixture
def two_runs(tmp_path, domain_shards) -> tuple[Path, Path]:
    train, val = domain_shards
    dense = fake_run(tmp_path, "proxy_dense.yaml", train, val,
                     speeds((1024, 100.0), (2048, 300.0)) + evals((1024, 3.0), (2048, 2.5)))  # fmt: skip
    moe = fake_run(tmp_path, "proxy_topk.yaml", train, val,
                   speeds((1024, 50.0), (2048, 150.0), (4096, 1000.0))
                   + evals((1024, 2.9), (2048, 2.6), (3072, 2.2), (4096, 2.3))
                   + [experts(1024, 0.4, 1.5), experts(2048, 0.2, 2.0), experts(4096, 0.9, 0.1)])  # fmt: skip
    return dense, moe


def test_runs_are_compared_at_the_smallest_tokens_seen(two_runs, tmp_path):
    dense, moe = two_runs
    report = compare_runs([dense, moe])
    d, m = report.runs
    assert report.equal_tokens == 2048  # dense stopped there; the MoE's later records do not count
    assert (d.router, m.router) == ("dense", "topk (2 of 16)")
    assert (d.tokens_seen, m.tokens_seen) == (2048, 4096)
    assert (m.val_loss, m.val_tokens, m.best_val_loss) == (2.6, 2048, 2.6)
    assert (d.val_loss, d.best_val_loss) == (2.5, 2.5)
    assert m.val_by_source == {"domain_00": pytest.approx(2.7), "domain_01": pytest.approx(2.5)}
    assert (m.tokens_per_s, d.tokens_per_s) == (100.0, 200.0)
    assert (m.max_load_share, m.router_entropy) == (0.2, 2.0)
    assert (d.max_load_share, d.router_entropy) == (None, None)
    assert m.curve[-1] == (4096, 2.3)  # the plot shows whole runs

    out = tmp_path / "report"
    md = write_comparison([dense, moe], out)
    assert "At 2,048 training tokens" in md and "| proxy_topk | topk (2 of 16) | 1 | 0 |" in md
    assert "| proxy_topk | 0 | +0.1000 | – | – | one seed: no interval | – | – |" in md
    assert "| domain_01 | 2.4000 / 2.4000 | 2.5000 / 2.5000 |" in md
    assert json.loads((out / "compare.json").read_text())["runs"][1]["best_val_loss"] == 2.6
    assert (out / "val_loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    result = CliRunner().invoke(ioe_train, ["compare", str(dense), str(moe), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["equal_tokens"] == 2048


def test_budgets_equal_active_parameters_and_flops():
    cfgs = {n: load_config(CONFIGS / f"proxy_{n}.yaml", ["data.train_dirs=[x]"]) for n in ("dense", "topk", "ioe")}
    dense, topk, ioe = (run_budget(cfgs[n]) for n in ("dense", "topk", "ioe"))
    assert dense.params_total == dense.params_active
    routers = 2 * 64 * 16  # layers x dim x experts: the gates, the only extra active weights
    assert topk.params_active == dense.params_active + routers
    assert ioe.params_active == dense.params_active + routers + 2 * 16  # + IoE's learned prior [E]
    assert topk.params_total == dense.params_total + routers + 2 * (16 - 2) * 3 * 64 * 64
    assert topk.flops_per_token - dense.flops_per_token == 6 * routers


def test_runs_on_other_data_are_refused_unless_allowed(two_runs, tmp_path, domain_shards):
    dense, moe = two_runs
    train, _ = domain_shards
    other = fake_run(tmp_path / "x", "proxy_ioe.yaml", train, train, evals((1024, 3.0)))  # val = train
    with pytest.raises(RunError, match=r"proxy_ioe: its val data differs from .*proxy_dense's"):
        compare_runs([dense, other])
    report = compare_runs([dense, moe, other], allow_mismatch=True)
    assert report.equal_tokens == 1024 and report.runs[2].router == "ioe (16, L 16)"
    assert report.protocol_differences == {"val data": {"proxy_dense": report.runs[0].fingerprints["val"],
                                                        "proxy_topk": report.runs[0].fingerprints["val"],
                                                        "proxy_ioe": report.runs[2].fingerprints["val"]}}
    result = CliRunner().invoke(ioe_train, ["compare", str(dense), str(other)])
    assert result.exit_code == 1 and "Error: " in result.output and "--allow-mismatch" in result.output


def test_expert_summary_goes_to_metrics_jsonl_and_the_heatmap_to_tensorboard(tmp_path):
    load = np.array([[6.0, 2.0, 0.0, 0.0], [2.0, 2.0, 2.0, 2.0]])  # [L, E]
    entropy = np.array([0.5, 1.3])
    log = MetricsLogger(tmp_path, rank=0, tensorboard=True, start_step=0, tokens_per_step=512)
    log.experts(3, load, entropy)
    log.close()
    (record,) = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert record == {"step": 3, "tokens": 1536, **expert_summary(load, entropy)}
    assert record["experts/max_share/layer_00"] == 0.75 and record["experts/max_share"] == 0.5
    assert record["experts/entropy"] == pytest.approx(0.9)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    (image,) = events.Images("experts/load_heatmap")
    assert image.width > 200 and image.height > 100  # a labelled figure, not a 4x2-cell raw image
