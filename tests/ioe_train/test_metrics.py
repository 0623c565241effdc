"""What a run reports: the log line's clock, which expert charts TensorBoard gets, the resolved
config in TensorBoard, and Weights & Biases in offline mode."""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest

from ioe_train.config import load_config
from ioe_train.metrics import MetricsLogger, format_line, heatmap_figure

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "tiny_cpu.yaml"
STEP = {"loss/total": 2.0, "loss/ce": 1.9, "loss/aux": 1.0, "loss/router": 0.01, "lr": 1e-3, "grad_norm": 0.5,
        "tokens_per_s": 1500.0, "memory_gib": 1.0}  # fmt: skip


def _events(directory: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(directory), size_guidance={"tensors": 0, "scalars": 0})
    events.Reload()
    return events


def test_log_line_ends_with_elapsed_and_eta():
    line = format_line(10, 40, STEP, elapsed=3725.2, eta=125.0)
    assert line.startswith("step 10/40 | loss 2.0000") and line.endswith(" | elapsed 1:02:05 eta 2:05")
    assert "elapsed" not in format_line(10, 40, STEP)


@pytest.mark.parametrize(("layers", "experts", "setting", "charts"),
                         [(2, 4, None, 8), (24, 8, None, 0), (24, 8, True, 192), (2, 4, False, 0)])  # fmt: skip
def test_per_expert_charts_are_optional_the_heatmap_and_layer_summaries_are_not(tmp_path, layers, experts,
                                                                              setting, charts):  # fmt: skip
    load = np.arange(layers * experts, dtype=np.float64).reshape(layers, experts) + 1
    log = MetricsLogger(tmp_path, rank=0, tensorboard=True, start_step=0, tokens_per_step=1,
                        per_expert_scalars=setting)  # fmt: skip
    log.experts(5, load, np.ones(layers))
    log.close()
    events = _events(tmp_path / "tb")
    scalars = events.Tags()["scalars"]
    assert len([t for t in scalars if t.startswith("experts/load/")]) == charts
    assert f"experts/max_share/layer_{layers - 1:02d}" in scalars and "experts/entropy" in scalars
    assert events.Tags()["images"] == ["experts/load_heatmap"]


def test_resolved_config_reaches_tensorboard_as_text_and_hparams(tmp_path):
    cfg = load_config(CONFIG, ["optim.lr=0.00123"])
    log = MetricsLogger(tmp_path, rank=0, tensorboard=True, start_step=0, tokens_per_step=1)
    log.config(cfg.to_yaml(), asdict(cfg))
    log.close()
    events = _events(tmp_path / "tb")
    (text,) = events.Tensors("config/text_summary")
    assert "lr: 0.00123" in text.tensor_proto.string_val[0].decode()
    from tensorboard.plugins.hparams import plugin_data_pb2

    start = plugin_data_pb2.HParamsPluginData.FromString(
        events.SummaryMetadata("_hparams_/session_start_info").plugin_data.content
    ).session_start_info  # fmt: skip
    assert start.hparams["optim.lr"].number_value == pytest.approx(0.00123)
    assert start.hparams["model.moe.router"].string_value == "topk"


def test_wandb_offline_gets_the_scalars_and_the_config(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = load_config(CONFIG, ["logging.wandb.project=ioe-test", "logging.wandb.mode=offline"])
    log = MetricsLogger(tmp_path, rank=0, tensorboard=False, start_step=0, tokens_per_step=1,
                        wandb=asdict(cfg.logging.wandb))  # fmt: skip
    log.config(cfg.to_yaml(), asdict(cfg))
    log.scalars(3, {"loss/ce": 2.5})
    log.experts(3, np.array([[3.0, 1.0]]), np.array([0.5]))
    run = log.wandb
    assert run.offline and run.project == "ioe-test" and run.config["optim.lr"] == cfg.optim.lr
    log.close()
    import wandb

    wandb.teardown()  # the wandb-core service writes the run file; stopping it flushes it
    (offline,) = (tmp_path / "wandb").glob("offline-run-*")
    assert offline.name.endswith((tmp_path / "wandb_run_id").read_text())  # resumable: the id is kept
    # the run file (protobuf records, read back by `wandb sync`) holds the logged keys and config
    keys = (b"loss/ce", b"experts/max_share", b"experts/load_heatmap", b"optim.lr", b"ioe-test")
    for _ in range(50):  # the service may still be closing the file
        records = next(offline.glob("*.wandb")).read_bytes()
        if all(key in records for key in keys):
            break
        time.sleep(0.2)
    for key in keys:
        assert key in records, key
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])["loss/ce"] == 2.5


@pytest.mark.parametrize("layers, experts", [(2, 16), (24, 8)])
def test_the_heatmap_shows_its_labels_whole(layers, experts):
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig = heatmap_figure(np.full((layers, experts), 10.0))
    FigureCanvasAgg(fig).draw()
    box = fig.bbox
    colorbar = fig.axes[1]
    texts = [colorbar.yaxis.label, fig.axes[0].title, fig.axes[0].xaxis.label, fig.axes[0].yaxis.label]
    for text in texts:
        extent = text.get_window_extent()
        inside = box.x0 <= extent.x0 and extent.x1 <= box.x1 and box.y0 <= extent.y0 and extent.y1 <= box.y1
        assert text.get_text() and inside, text
