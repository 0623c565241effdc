"""`ioe-train compare` on run directories made here (config.yaml + metrics.jsonl), and the
trainer's expert summary in metrics.jsonl."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from ioe_train.cli import main as ioe_train
from ioe_train.compare import compare_runs, router_label, run_budget, write_comparison
from ioe_train.config import load_config
from ioe_train.metrics import MetricsLogger, expert_summary
from ioe_train.runs import RunError

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def fake_run(root: Path, config: str, train: Path, val: Path, records: list[dict], name: str | None = None,
             overrides: tuple[str, ...] = ()) -> Path:  # fmt: skip
    """A run directory root/NAME (default: the config's name) as the trainer leaves it."""
    out = root / (name or config.removesuffix(".yaml"))
    cfg = load_config(CONFIGS / config, [f"data.train_dirs=[{train}]", f"data.val_dirs=[{val}]", f"output_dir={out}",
                                         *overrides])  # fmt: skip
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
    val, other_val = (report.runs[i].fingerprints["val"][:19] for i in (0, 2))  # "sha256:" + 12 hex digits
    assert val != other_val and report.protocol_differences == {
        "val data": {"proxy_dense": val, "proxy_topk": val, "proxy_ioe": other_val}}  # fmt: skip
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


T2 = 4.302652729911275  # t_{0.975} with 2 degrees of freedom


def seed_runs(root: Path, arm: str, config: str, shards: tuple[Path, Path], losses: dict[int, float],
              *overrides: str) -> Path:  # fmt: skip
    """root/ARM/seed_N as `launch --seeds` leaves them: the last val loss of seed N is losses[N], the
    best 0.05 lower (at the first evaluation)."""
    for seed, loss in losses.items():
        fake_run(root / arm, config, *shards, evals((1024, loss - 0.05), (2048, loss)), name=f"seed_{seed}",
                 overrides=(f"seed={seed}", f"data.seed={seed}", *overrides))  # fmt: skip
    return root / arm


@pytest.fixture
def arms(tmp_path, domain_shards) -> list[Path]:
    dense = seed_runs(tmp_path, "proxy_dense", "proxy_dense.yaml", domain_shards, {0: 1.30, 1: 1.32, 2: 1.31})
    topk = seed_runs(tmp_path, "proxy_topk", "proxy_topk.yaml", domain_shards, {0: 1.20, 1: 1.23, 2: 1.20})
    # seeds 1-3: seed 0 of the baseline and seed 3 here have no partner
    ioe = seed_runs(tmp_path, "proxy_ioe", "proxy_ioe.yaml", domain_shards, {3: 1.00, 1: 1.425, 2: 1.41})
    # the dense config at another lr, given run by run (not as a directory of seeds), seeds shuffled
    lr = [fake_run(tmp_path, "proxy_dense.yaml", *domain_shards, evals((2048, loss)), name=f"lr_{seed}",
                   overrides=(f"seed={seed}", f"data.seed={seed}", "optim.lr=0.02"))
          for seed, loss in ((2, 1.33), (0, 1.31), (1, 1.29))]  # fmt: skip
    return [dense, topk, ioe, *lr]


def test_arms_group_seeds_and_pair_them_with_the_baseline_by_seed(arms):
    report = compare_runs(arms)
    assert [a.name for a in report.arms] == ["proxy_dense", "proxy_topk", "proxy_ioe", "lr_2"]
    assert [a.seeds for a in report.arms] == [["0", "1", "2"], ["0", "1", "2"], ["1", "2", "3"], ["0", "1", "2"]]
    assert [r.name for r in report.runs[:2]] == ["proxy_dense/seed_0", "proxy_dense/seed_1"]
    dense, topk, ioe, lr = report.arms
    assert report.baseline == "proxy_dense" and dense.n == 3
    assert dense.mean == pytest.approx(1.31, abs=1e-12)
    assert dense.sd == pytest.approx(0.01, abs=1e-12)  # sqrt((0.01^2 + 0.01^2 + 0) / (3 - 1))
    assert (dense.best_mean, dense.best_sd) == (pytest.approx(1.26, abs=1e-12), pytest.approx(0.01, abs=1e-12))
    assert topk.sd == pytest.approx(math.sqrt((0.01**2 * 2 + 0.02**2) / 2), abs=1e-12)
    assert dense.val_by_source == {"domain_00": pytest.approx(1.41), "domain_01": pytest.approx(1.21)}

    better, worse, same = report.comparisons
    # proxy_topk - proxy_dense: -0.10, -0.09, -0.11
    assert (better.arm, better.baseline, better.seeds, better.unpaired) == ("proxy_topk", "proxy_dense",
                                                                           ["0", "1", "2"], [])  # fmt: skip
    assert better.diffs == pytest.approx([-0.10, -0.09, -0.11], abs=1e-12)
    assert (better.diff_mean, better.diff_sd) == (pytest.approx(-0.10, abs=1e-12), pytest.approx(0.01, abs=1e-12))
    half = T2 * 0.01 / math.sqrt(3)
    assert better.ci95 == (pytest.approx(-0.10 - half, abs=1e-6), pytest.approx(-0.10 + half, abs=1e-6))
    assert better.verdict == "better"
    # proxy_ioe - proxy_dense over seeds 1 and 2 only: +0.105, +0.100; t_{0.975} with 1 dof = 12.706...
    assert (worse.seeds, worse.unpaired) == (["1", "2"], ["0 (proxy_dense only)", "3 (proxy_ioe only)"])
    assert worse.diffs == pytest.approx([0.105, 0.10], abs=1e-12)
    half = 12.706204736174707 * (0.005 / math.sqrt(2)) / math.sqrt(2)
    assert worse.ci95 == (pytest.approx(0.1025 - half, abs=1e-6), pytest.approx(0.1025 + half, abs=1e-6))
    assert worse.verdict == "worse"
    # lr_2 - proxy_dense, paired by seed although given in the order 2, 0, 1: +0.01, -0.03, +0.02
    assert same.diffs == pytest.approx([0.01, -0.03, 0.02], abs=1e-12)
    half = T2 * math.sqrt((0.01**2 + 0.03**2 + 0.02**2) / 2) / math.sqrt(3)
    assert same.ci95 == (pytest.approx(-half, abs=1e-6), pytest.approx(half, abs=1e-6))
    assert same.verdict == "not distinguishable at n = 3"

    versus_ioe = {c.arm: c for c in compare_runs(arms, baseline="proxy_ioe").comparisons}
    assert versus_ioe["proxy_topk"].diffs == pytest.approx([1.23 - 1.425, 1.20 - 1.41], abs=1e-12)
    assert versus_ioe["proxy_dense"].verdict == "better"
    with pytest.raises(RunError, match=r"--baseline proxy_moe: not an arm here \(proxy_dense, proxy_topk, "):
        compare_runs(arms, baseline="proxy_moe")


def test_the_report_shows_arms_differences_and_stable_json_keys(arms, tmp_path):
    out = tmp_path / "report"
    result = CliRunner().invoke(ioe_train, ["compare", *map(str, arms), "--baseline", "proxy_topk", "--out", str(out)])
    assert result.exit_code == 0, result.output
    md = result.output
    assert "| proxy_dense | dense | 3 | 0, 1, 2 | 82.6k / 82.6k | 545k | 1.3100 ± 0.0100 | 1.2600 ± 0.0100 |" in md
    assert "| proxy_ioe | 1, 2 | +0.2025 | 0.0106 |" in md  # 1.425 - 1.23, 1.41 - 1.20
    assert "| worse | 0 (proxy_topk only), 3 (proxy_ioe only) | – |" in md
    assert "Protocol differences: none" in md and "selected on the very validation set it reports" in md
    report = json.loads((out / "compare.json").read_text())
    assert report.keys() >= {"equal_tokens", "baseline", "arms", "comparisons", "protocol_differences", "runs"}
    assert report["baseline"] == "proxy_topk" and report["protocol_differences"] == {}
    assert report["arms"][0].keys() >= {"name", "n", "mean", "sd", "seeds", "best_mean", "best_sd", "budget"}
    assert report["comparisons"][0].keys() >= {"arm", "diff_mean", "diff_sd", "ci95", "verdict", "protocol_differences"}
    assert report["arms"][0]["seeds"] == ["0", "1", "2"]
    assert (out / "val_loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_protocol_differences_are_flagged_not_refused(tmp_path, domain_shards):
    losses = {0: 1.3, 1: 1.31}
    plain = ("eval.per_document=false", "eval.packing=null")  # not the proxy configs' fixed protocol
    base = seed_runs(tmp_path, "causal", "proxy_ioe.yaml", domain_shards, losses, *plain)
    variants = {"block": ["model.attention=block_causal"], "by_source": ["data.packing=by_source"],
                "per_doc": ["eval.per_document=true"], "val_stream": ["data.packing=by_source", "eval.packing=stream"]}
    others = [seed_runs(tmp_path, name, "proxy_ioe.yaml", domain_shards, losses, *plain, *o)
              for name, o in variants.items()]  # fmt: skip
    report = compare_runs([base, *others])
    assert [a.router for a in report.arms] == ["ioe (16, L 16)", "ioe (16, L 16) · block_causal",
                                               "ioe (16, L 16) · by_source", "ioe (16, L 16)",
                                               "ioe (16, L 16) · by_source"]  # fmt: skip
    assert report.protocol_differences == {
        "model.attention": {"causal": "causal", "block": "block_causal", "by_source": "causal", "per_doc": "causal",
                            "val_stream": "causal"},
        "data.packing": {"causal": "stream", "block": "stream", "by_source": "by_source", "per_doc": "stream",
                         "val_stream": "by_source"},
        "val packing": {"causal": "stream", "block": "stream", "by_source": "by_source", "per_doc": "stream",
                        "val_stream": "stream"},
        "eval.per_document": {"causal": "false", "block": "false", "by_source": "false", "per_doc": "true",
                              "val_stream": "false"},
    }  # fmt: skip
    assert [c.protocol_differences for c in report.comparisons] == [
        {"model.attention": ["causal", "block_causal"]},
        {"data.packing": ["stream", "by_source"], "val packing": ["stream", "by_source"]},
        {"eval.per_document": ["false", "true"]},
        {"data.packing": ["stream", "by_source"]},
    ]  # fmt: skip
    md = write_comparison([base, *others], None)
    assert "**Protocol differences**" in md and "| eval.per_document | false | false | false | true | false |" in md
    assert "| block | 0, 1 | +0.0000 | 0.0000 | [+0.0000, +0.0000] | not distinguishable at n = 2 | – " \
           "| model.attention: causal → block_causal |" in md


def test_router_labels_name_what_is_not_the_default():
    def label(*overrides):
        return router_label(load_config(CONFIGS / "proxy_ioe.yaml", list(overrides)))

    assert label() == "ioe (16, L 16)"
    assert label("model.moe.ioe_document_reset=true", "model.moe.ioe_expert_init=unit",
                 "data.packing=by_source") == "ioe (16, L 16, doc reset, init unit) · by_source"  # fmt: skip


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_compare_shows_progress_on_a_terminal(arms, monkeypatch):
    terminal = _Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    compare_runs(arms, progress=True)
    assert "compare:" in terminal.getvalue() and "run" in terminal.getvalue()
    terminal.truncate(0)
    compare_runs(arms)
    assert terminal.getvalue() == ""
