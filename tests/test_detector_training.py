"""The detector's training loop, COCO evaluation, checkpoints, torchrun and the two tools (tools/train.py,
tools/eval.py), on tiny data."""
from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from _helpers import load_tool, run_tool

from roikit.analysis.runs import load_run
from roikit.data import build_datasets, make_shapes_dataset
from roikit.engine import coco_evaluate, load_config, save_checkpoint
from roikit.engine import trainer as trainer_module
from roikit.engine.checkpoint import CHECKPOINT_NAME, first_non_finite, load_checkpoint
from roikit.engine.trainer import METRICS_NAME
from roikit.io import atomic_torch_save, read_jsonl

REPO = Path(__file__).resolve().parents[1]
train_tool = load_tool("train")
eval_tool = load_tool("eval")


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return make_shapes_dataset(tmp_path_factory.mktemp("shapes"), num_train=8, num_val=4, image_size=96, seed=0,
                               progress=False)


TINY = {
    "model": {
        "backbone": {"channels": [8, 16, 16, 32]},
        "transform": {"min_size": 96, "max_size": 96},
        "rpn": {"pre_nms_top_n_train": 200, "post_nms_top_n_train": 100, "pre_nms_top_n_test": 100,
                "post_nms_top_n_test": 50, "batch_size_per_image": 64},
        "box_head": {"fc_dims": [32, 32]},
        "roi_heads": {"batch_size_per_image": 32},
    },
    "data": {"batch_size": 2, "eval_batch_size": 4},
    "solver": {"lr": 0.01, "max_iter": 4, "warmup_iters": 1},
    "train": {"checkpoint_period": 2, "log_period": 1},
}


@pytest.fixture
def tiny_config(tiny_data, tmp_path):
    """A config file over configs/base_shapes.yaml for 96x96 images, a narrow model and 4 iterations."""
    cfg = copy.deepcopy(TINY)
    cfg["_base_"] = str(REPO / "configs" / "base_shapes.yaml")
    cfg["data"].update({key: tiny_data[key] for key in
                        ("train_images", "train_annotations", "val_images", "val_annotations")})
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _metrics(run_dir: Path) -> list[dict]:
    return read_jsonl(run_dir / METRICS_NAME)


# ------------------------------------------------------------------------------------------------------- evaluation
def test_coco_eval_ground_truth_as_results_gives_ap_1(tiny_data):
    _, val_set = build_datasets(load_config(REPO / "configs" / "base_shapes.yaml", [
        f"data.{key}={tiny_data[key]}" for key in ("train_images", "train_annotations", "val_images",
                                                   "val_annotations")]), train=False)
    results = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
               for a in val_set.coco.dataset["annotations"]]
    metrics = coco_evaluate(val_set.coco, results)
    for name in ("AP", "AP50", "AP75"):
        assert metrics[name] == pytest.approx(1.0)
    present = {val_set.coco.cats[a["category_id"]]["name"] for a in val_set.coco.dataset["annotations"]}
    assert all(metrics["per_class"][name]["AP"] == pytest.approx(1.0) for name in present)
    assert coco_evaluate(val_set.coco, [])["AP"] == 0.0


# -------------------------------------------------------------------------------------------- training and the tools
def test_train_then_eval_end_to_end(tiny_config, tmp_path, capsys):
    run = tmp_path / "run"
    assert run_tool(train_tool, ["--config", str(tiny_config), "--output-dir", str(run), "--no-progress"]) == 0
    records = _metrics(run)
    assert [r["iter"] for r in records if r["type"] == "train"] == [1, 2, 3, 4]
    assert all(r["loss"] > 0 for r in records if r["type"] == "train")
    final = [r for r in records if r["type"] == "eval"]
    assert len(final) == 1 and final[0]["iter"] == 4 and 0.0 <= final[0]["AP"] <= 1.0
    saved = json.loads((run / "eval_final_metrics.json").read_text())
    assert saved["AP"] == final[0]["AP"] and saved["iteration"] == 4 and saved["images"] == 4
    assert load_run(run)["AP"] == final[0]["AP"]  # tools/compare_runs.py reads it
    results = json.loads((run / "eval_final_results.json").read_text())
    assert isinstance(results, list) and len(results) == saved["num_detections"]
    assert f"iter 2: saved checkpoint {run / CHECKPOINT_NAME}\n" in capsys.readouterr().out
    assert torch.load(run / CHECKPOINT_NAME, weights_only=True)["iteration"] == 4
    assert yaml.safe_load((run / "config.yaml").read_text())["model"]["num_classes"] == 6

    ckpt = str(run / CHECKPOINT_NAME)
    assert run_tool(eval_tool, ["--config", str(tiny_config), "--checkpoint", ckpt, "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "Average Precision" in out and "circle" in out
    saved = json.loads((run / "eval_metrics.json").read_text())
    assert saved["AP"] == pytest.approx(final[0]["AP"])
    assert isinstance(json.loads((run / "eval_results.json").read_text()), list)

    assert run_tool(eval_tool, ["--config", str(tiny_config), "--checkpoint", ckpt, "--no-progress",
                                "--pooler", "roi_pool:rounding=integer"]) == 0
    saved = json.loads((run / "eval_roi_pool-rounding-integer_metrics.json").read_text())
    assert saved["pooler"]["op"] == "roi_pool" and saved["pooler"]["options"] == {"rounding": "integer"}
    capsys.readouterr()
    # options of the configured op are laid over the configured ones (aligned=True stays), and printed in full
    assert run_tool(eval_tool, ["--config", str(tiny_config), "--checkpoint", ckpt, "--no-progress",
                                "--pooler", "roi_align:sampling_ratio=0"]) == 0
    assert ("with RoIPooler(featmap_names=['0'], output_size=(7, 7), sampling_ratio=0, op='roi_align', "
            "aligned=True)") in capsys.readouterr().out
    saved = json.loads((run / "eval_roi_align-sampling_ratio-0_metrics.json").read_text())
    assert saved["pooler"] == {"op": "roi_align", "output_size": 7, "sampling_ratio": 0, "options": {"aligned": True}}


def _interrupt_after(monkeypatch, batches: int) -> None:
    """Make the training data run out with a KeyboardInterrupt after ``batches`` batches, as a kill would."""
    make = trainer_module.make_train_loader

    def limited(*args, **kwargs):
        loader = make(*args, **kwargs)
        for _ in range(batches):
            yield next(loader)
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer_module, "make_train_loader", limited)


def test_resume_continues_with_identical_state(tiny_config, tmp_path, monkeypatch):
    cfg = load_config(tiny_config, ["data.hflip=0.5"])
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    trainer_module.train(cfg, straight, progress=False)

    with monkeypatch.context() as m:
        _interrupt_after(m, 3)  # killed during iteration 4; the last checkpoint is the one of iteration 2
        with pytest.raises(KeyboardInterrupt):
            trainer_module.train(cfg, resumed, progress=False)
    assert torch.load(resumed / CHECKPOINT_NAME, weights_only=True)["iteration"] == 2
    # what a kill during a checkpoint write leaves, and files of others that a start must not touch
    stale = [resumed / ".checkpoint.pth.k2j4x8_a.tmp", resumed / ".config_resume_2.yaml.ab12cd34.tmp"]
    others = [resumed / ".eval_metrics.json.ab12cd34.tmp", resumed / "notes.tmp", resumed / ".checkpoint.pth"]
    for path in stale + others:
        path.write_bytes(b"x" * 1000)
    trainer_module.resume(resumed, progress=False)
    assert not any(path.exists() for path in stale) and all(path.exists() for path in others)

    a = torch.load(straight / CHECKPOINT_NAME, weights_only=True)
    b = torch.load(resumed / CHECKPOINT_NAME, weights_only=True)
    assert a["iteration"] == b["iteration"] == 4
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert sa.keys() == sb.keys() and len(sa) > 0  # SGD's momentum or AdamW's moments and step
        for name in sa:
            assert torch.equal(torch.as_tensor(sa[name]), torch.as_tensor(sb[name])), name
    assert a["scheduler"] == b["scheduler"]
    # the resumed run logged iterations 1 2 3 (then was killed), then 3 4 again from the checkpoint of 2
    assert [r["iter"] for r in _metrics(resumed) if r["type"] == "train"] == [1, 2, 3, 3, 4]


def _checkpoint_parts(model) -> dict:
    """What save_checkpoint takes besides the path and the iteration: ``model`` with SGD, a constant schedule and a
    disabled scaler."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: 1.0)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    return dict(model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler, cfg={"model": {}})


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    model = torch.nn.Linear(3, 2)
    path = tmp_path / CHECKPOINT_NAME
    kwargs = _checkpoint_parts(model)
    save_checkpoint(path, iteration=1, **kwargs)
    before = path.read_bytes()

    def dies_half_way(obj, f, *args, **kw):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", dies_half_way)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, iteration=2, **kwargs)
    assert path.read_bytes() == before  # the old checkpoint, whole
    assert [p.name for p in tmp_path.iterdir()] == [CHECKPOINT_NAME]  # no temporary file left behind


def test_non_finite_loss_stops_with_a_clear_message(tiny_config, tmp_path, capsys):
    run = tmp_path / "run"
    code = run_tool(train_tool, ["--config", str(tiny_config), "--output-dir", str(run), "--no-progress",
                                 "solver.lr=1e30", "solver.warmup_iters=0", "solver.max_iter=3"])
    err = capsys.readouterr().err.strip()
    assert code == 1
    assert len(err.splitlines()) == 1
    assert err.startswith("train.py: error: loss is ")
    assert "training stopped, no checkpoint written yet; lower solver.lr" in err


def test_non_finite_weights_stop_training_and_keep_the_last_good_checkpoint(tiny_config, tmp_path, capsys):
    """SGD at lr 50: the loss stays finite, but BatchNorm's running_var overflows during iteration 5. The run must
    stop there, non-zero, naming the tensor and the checkpoint of iteration 4, which stays whole and finite."""
    run = tmp_path / "run"
    code = run_tool(train_tool, ["--config", str(tiny_config), "--output-dir", str(run), "--no-progress",
                                 "solver.optimizer=sgd", "solver.lr=50.0", "solver.warmup_iters=0",
                                 "train.checkpoint_period=1", "solver.max_iter=6"])
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1
    assert err == (f"train.py: error: backbone.body.1.1.running_var is not finite after the step at iteration 5: "
                   f"training stopped, the last good checkpoint is {run / CHECKPOINT_NAME} (iteration 4); lower "
                   f"solver.lr, raise solver.warmup_iters or set solver.clip_grad_norm")
    ckpt = torch.load(run / CHECKPOINT_NAME, weights_only=True)
    assert ckpt["iteration"] == 4 and first_non_finite(ckpt["model"]) is None
    assert first_non_finite(ckpt["optimizer"]) is None
    assert not list(run.glob("eval_final*"))  # the spoilt model is not evaluated


def test_checkpoints_with_non_finite_values_are_neither_written_nor_loaded(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    path = tmp_path / CHECKPOINT_NAME
    kwargs = _checkpoint_parts(model)
    save_checkpoint(path, iteration=1, **kwargs)
    before = path.read_bytes()
    assert first_non_finite(model.state_dict()) is None
    with torch.no_grad():
        model[1].running_var[1] = float("inf")  # a buffer
    assert first_non_finite(model.state_dict()) == "1.running_var"
    with pytest.raises(FloatingPointError,
                       match=f"not writing checkpoint {path} of iteration 2: model.1.running_var is not finite"):
        save_checkpoint(path, iteration=2, **kwargs)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == [CHECKPOINT_NAME]
    assert first_non_finite({"state": {0: {"momentum_buffer": torch.tensor([0.0, float("nan")])}}}) == \
        "state.0.momentum_buffer"
    # a checkpoint spoilt elsewhere (by an older version) is refused, not evaluated to AP 0
    state = model.state_dict()
    atomic_torch_save(tmp_path / "spoilt.pth", {"model": state})
    with pytest.raises(ValueError, match=r"spoilt.pth holds non-finite values in 1.running_var"):
        load_checkpoint(tmp_path / "spoilt.pth", model=model)


def test_resume_keeps_the_runs_own_config(tiny_config, tmp_path, capsys):
    """The run was made with solver.max_iter=2; resuming it without that override must not take the config file's
    4, and config.yaml must stay the run's own. An override given on resume is applied, printed and recorded."""
    run = tmp_path / "run"
    assert run_tool(train_tool, ["--config", str(tiny_config), "--output-dir", str(run), "--no-progress",
                                 "solver.max_iter=2"]) == 0
    original = (run / "config.yaml").read_bytes()
    capsys.readouterr()
    assert run_tool(train_tool, ["--config", str(tiny_config), "--output-dir", str(run), "--resume",
                                 "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert f"resumed from {run / CHECKPOINT_NAME} at iteration 2, with the config saved in it\n" in out
    assert "training 0 iterations (2 -> 2)" in out
    assert (run / "config.yaml").read_bytes() == original and not list(run.glob("config_resume_*"))

    assert run_tool(train_tool, ["--output-dir", str(run), "--resume", "--no-progress", "solver.max_iter=3",
                                 "solver.lr=0.01"]) == 0  # no --config needed; lr 0.01 is no change
    out = capsys.readouterr().out
    assert ("at iteration 2, with the config saved in it, changed: solver.max_iter 2 -> 3 (recorded in "
            "config_resume_2.yaml)") in out and "training 1 iterations (2 -> 3)" in out
    assert (run / "config.yaml").read_bytes() == original
    record = (run / "config_resume_2.yaml").read_text()
    assert record.startswith("# resumed at iteration 2, changed: solver.max_iter 2 -> 3\n")
    assert yaml.safe_load(record)["solver"]["max_iter"] == 3 and yaml.safe_load(original)["solver"]["max_iter"] == 2
    assert torch.load(run / CHECKPOINT_NAME, weights_only=True)["config"]["solver"]["max_iter"] == 3

    assert run_tool(train_tool, ["--output-dir", str(run), "--resume", "model.box_head.fc_dims=[8]"]) == 2
    assert "was trained with another model config (model.box_head.fc_dims: checkpoint [32, 32], config [8])" in \
        capsys.readouterr().err


def test_a_file_no_worker_can_decode_is_one_line_naming_it(tiny_config, tiny_data, tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    for path in Path(tiny_data["train_images"]).iterdir():
        (images / path.name).write_bytes(b"not a png")
    code = run_tool(train_tool, ["--config", str(tiny_config), "--output-dir", str(tmp_path / "run"),
                                 "--no-progress", f"data.train_images={images}", "data.num_workers=2"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert re.fullmatch(rf"train.py: error: {re.escape(tiny_data['train_annotations'])}: cannot decode the image "
                        rf"file of image id \d+: {re.escape(str(images))}/\d+\.png", err), err


@pytest.mark.parametrize("argv, message", [
    (["--config", "{missing}"], "train.py: error: config file not found: "),
    (["--config", "{cfg}", "solver.max_iters=3"], "train.py: error: override 'solver.max_iters=3': unknown config key"),
    (["--config", "{cfg}", "--resume", "--output-dir", "{tmp}/empty"], "train.py: error: --resume: no checkpoint in "),
    (["--config", "{cfg}", "data.train_annotations={tmp}/none.json"], "train.py: error: annotation file not found"),
    (["--config", "{cfg}", "model.pooler.options={{spacing: 2}}"], "train.py: error: model.pooler.options {{'spacing': 2}} for roi_align: "),
    (["--config", "{cfg}", "model.transform.min_size=0"], "train.py: error: override 'model.transform.min_size=0': model.transform.min_size must be an int >= 1, got 0"),
    (["--config", "{cfg}", "data.batch_size=0"], "train.py: error: override 'data.batch_size=0': data.batch_size must be an int >= 1, got 0"),
    (["--config", "{cfg}", "model.rpn.nms_thresh=-1"], "train.py: error: override 'model.rpn.nms_thresh=-1': model.rpn.nms_thresh must be in [0, 1], got -1"),
    (["--config", "{cfg}", "--output-dir", "{cfg}"], "train.py: error: --output-dir {cfg} is a file, not a folder"),
    (["--resume"], "train.py: error: --config is needed (or --resume with --output-dir)"),
    (["--config", "{cfg}", "data.shapes.root={cfg}", "data.train_images=null"],
     "train.py: error: data.shapes.root {cfg} is a file, not a folder"),
    (["--config", "{cfg}", "--output-dir", "{tmp}/old"], "train.py: error: {tmp}/old holds a run already "
                                                         "(metrics.jsonl): --resume continues it; to start again,"),
])
def test_train_tool_bad_input(tiny_config, tmp_path, capsys, argv, message):
    argv = [a.format(cfg=tiny_config, tmp=tmp_path, missing=tmp_path / "missing.yaml") for a in argv]
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / METRICS_NAME).write_text('{"type": "train", "iter": 1}\n')  # a run killed before its checkpoint
    assert run_tool(train_tool, argv + ["--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(message.format(tmp=tmp_path, cfg=tiny_config)), err


def test_eval_tool_bad_input(tiny_config, tmp_path, capsys):
    run = tmp_path / "run"
    assert run_tool(train_tool, ["--config", str(tiny_config), "--output-dir", str(run), "--no-progress",
                                 "solver.max_iter=1", "data.val_annotations=" + str(_first_image_only(tmp_path,
                                                                                            tiny_config))]) == 0
    capsys.readouterr()
    ckpt = str(run / CHECKPOINT_NAME)
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    cases = [
        (["--checkpoint", str(tmp_path / "none.pth")], "eval.py: error: checkpoint not found: "),
        (["--checkpoint", str(tmp_path / "junk.pth")], "eval.py: error: cannot read checkpoint "),
        (["--checkpoint", ckpt, "model.box_head.fc_dims=[16,32]"],
         "eval.py: error: checkpoint " + ckpt + " does not match the model of the config: 3 tensor(s) of another "
                                                "shape (e.g. roi_heads.box_head.layers.1.weight: checkpoint [32, "
                                                "1568], model [16, 1568])"),
        (["--checkpoint", ckpt, "--pooler", "roi_spp"], "eval.py: error: checkpoint " + ckpt + " does not match"),
        (["--checkpoint", ckpt, "--pooler", "roi_pool:rounding"], "eval.py: error: --pooler 'roi_pool:rounding': "
                                                                  "'rounding' is not key=value"),
        (["--checkpoint", ckpt, "--pooler", "roi_pool:rounding=floor"], "eval.py: error: rounding must be one of"),
        (["--checkpoint", ckpt, "--pooler", "roi_align:aligned=nope"], "eval.py: error: aligned must be True or False"),
        (["--checkpoint", ckpt, "--pooler", "roi_align:aligned=[1"],
         "eval.py: error: --pooler 'roi_align:aligned=[1', aligned: malformed value '[1': "),
        (["--checkpoint", ckpt, "--name", "../../x"],
         f"eval.py: error: --name '../../x' must be a plain file name (no folder, not hidden), to stay in {run}"),
        (["--checkpoint", ckpt, "--output-dir", ckpt], f"eval.py: error: --output-dir {ckpt} is a file, not a folder"),
    ]
    for argv, message in cases:
        assert run_tool(eval_tool, ["--config", str(tiny_config), "--no-progress"] + argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith(message), err
    assert not (tmp_path.parent / "x_metrics.json").exists() and not (tmp_path.parent / "x_results.json").exists()


def _first_image_only(tmp_path: Path, config: Path) -> Path:
    """A validation file with one image, to make a quick evaluation."""
    cfg = load_config(config)
    data = json.loads(Path(cfg["data"]["val_annotations"]).read_text())
    first = data["images"][0]["id"]
    data["images"] = data["images"][:1]
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] == first]
    path = tmp_path / "val_one.json"
    path.write_text(json.dumps(data))
    return path


# ----------------------------------------------------------------------------------------------------------- torchrun
def test_torchrun_two_processes_train_and_resume(tiny_config, tmp_path):
    run = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    base = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            str(REPO / "tools" / "train.py"), "--config", str(tiny_config), "--output-dir", str(run), "--no-progress",
            "data.batch_size=1"]

    def launch(*extra: str) -> str:
        proc = subprocess.run(base + list(extra), env=env, capture_output=True, text=True, timeout=240, cwd=REPO)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
        return proc.stdout

    out = launch("solver.max_iter=2")
    assert "on 2 x cpu" in out and out.count("training 2 iterations") == 1  # rank 0 alone prints
    assert torch.load(run / CHECKPOINT_NAME, weights_only=True)["iteration"] == 2
    out = launch("solver.max_iter=4", "--resume")
    assert "at iteration 2" in out and "training 2 iterations (2 -> 4)" in out
    ckpt = torch.load(run / CHECKPOINT_NAME, weights_only=True)
    assert ckpt["iteration"] == 4 and len(ckpt["rng"]) == 2  # both ranks' random states
    assert [r["iter"] for r in _metrics(run) if r["type"] == "train"] == [1, 2, 3, 4]
    assert [r["iter"] for r in _metrics(run) if r["type"] == "eval"] == [2, 4]
