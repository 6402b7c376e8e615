"""The box head's pooling-family hook: each head pool against a hand-computed value, and in a training detector."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from roikit.engine import load_config
from roikit.engine.config import apply_overrides
from roikit.modeling import FastRCNNConvFCHead, build_detector

REPO = Path(__file__).resolve().parents[1]


def _features(k=5, c=6, size=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(k, c, size, size, generator=g, dtype=torch.float64)


def _head(**kwargs):
    return FastRCNNConvFCHead(input_shape=(6, 7, 7), **{"fc_dims": (), **kwargs}).double()


def test_global_pools_are_the_mean_and_max_over_the_grid():
    x = _features()
    avg, mx = _head(pool="global_avg"), _head(pool="global_max")
    assert avg.out_features == mx.out_features == 6
    torch.testing.assert_close(avg(x), x.sum((2, 3)) / 49)
    torch.testing.assert_close(mx(x), x.flatten(2).max(2).values)


def test_windowed_and_overlapping_pools_keep_a_grid_then_flatten():
    x = _features()
    over = _head(pool="overlapping_max")  # kernel 3 stride 2: bins start at 0, 2, 4 -> 3x3
    assert over.out_features == 6 * 9
    expected = torch.stack([x[:, :, 2 * i:2 * i + 3, 2 * j:2 * j + 3].amax((2, 3))
                            for i in range(3) for j in range(3)], dim=2)  # [K, C, 9]
    torch.testing.assert_close(over(x), expected.flatten(1))
    avg = _head(pool="avg", pool_options={"kernel_size": 3, "stride": 2})
    expected = torch.stack([x[:, :, 2 * i:2 * i + 3, 2 * j:2 * j + 3].mean((2, 3))
                            for i in range(3) for j in range(3)], dim=2)
    torch.testing.assert_close(avg(x), expected.flatten(1))


def test_stochastic_head_pool_is_the_weighted_average_in_eval_and_a_draw_in_training():
    x = _features(size=4)
    head = FastRCNNConvFCHead(input_shape=(6, 4, 4), fc_dims=(), pool="stochastic").double()
    assert head.training and head.out_features == 6 * 4
    windows = x.unfold(2, 2, 2).unfold(3, 2, 2).reshape(5, 6, 2, 2, 4)  # [K, C, 2, 2, 4 cells]
    head.eval()
    torch.testing.assert_close(head(x), ((windows ** 2).sum(-1) / windows.sum(-1)).flatten(1))
    head.train()
    drawn = head(x).view(5, 6, 2, 2, 1)
    assert bool((drawn == windows).any(-1).all())  # every output is one of its window's cells


def test_bilinear_head_pools_are_second_order_statistics():
    x = _features()
    head = _head(pool="bilinear", pool_options={"signed_sqrt": False, "l2_normalize": False})
    assert head.out_features == 36
    outer = torch.einsum("kip,kjp->kij", x.flatten(2), x.flatten(2)) / 49
    torch.testing.assert_close(head(x), outer.flatten(1))

    normed = _head(pool="bilinear")(x)  # signed sqrt, then unit L2 norm per region
    z = outer.flatten(1).sqrt()
    torch.testing.assert_close(normed, z / z.norm(dim=1, keepdim=True))

    compact = _head(pool="compact_bilinear", pool_options={"output_dim": 4096, "signed_sqrt": False,
                                                            "l2_normalize": False})
    assert compact.out_features == 4096
    sketch = compact(x)
    # the sketch preserves inner products of the full bilinear features (unbiased, error ~ ||B||^2 / sqrt(D))
    full = outer.flatten(1)
    torch.testing.assert_close(sketch @ sketch.T, full @ full.T, rtol=0.1, atol=0.0)
    by_fft = _head(pool="compact_bilinear", pool_options={"output_dim": 4096, "signed_sqrt": False,
                                                           "l2_normalize": False, "method": "fft"})
    torch.testing.assert_close(by_fft(x), sketch)  # the same sketch by the other route


def test_spp_head_pool_and_convolutions_before_the_pool():
    x = _features()
    spp = _head(pool="spp", pool_options={"levels": [1, 2], "mode": "max"})
    assert spp.out_features == 6 * 5
    torch.testing.assert_close(spp(x)[:, :6], x.amax((2, 3)))  # level 1 first: the global max

    torch.manual_seed(0)
    head = FastRCNNConvFCHead(input_shape=(6, 7, 7), conv_dims=(8, 4), pool="global_avg", fc_dims=(3,)).double()
    conv1, conv2, fc = head.layers[0], head.layers[2], head.layers[5]
    expected = F.relu(fc(F.relu(conv2(F.relu(conv1(x)))).mean((2, 3))))
    torch.testing.assert_close(head(x), expected)
    assert head.out_features == 3 and fc.in_features == 4


def test_plain_head_keeps_its_layer_names():
    """pool="none" is Fast R-CNN's flatten + fc layers, with the state-dict keys of earlier checkpoints."""
    head = FastRCNNConvFCHead(input_shape=(6, 7, 7), fc_dims=(16, 12))
    assert [type(m).__name__ for m in head.layers] == ["Flatten", "Linear", "ReLU", "Linear", "ReLU"]
    assert head.layers[1].in_features == 6 * 49


@pytest.mark.parametrize("kwargs, message", [
    ({"pool": "median"}, "head pool must be one of"),
    ({"pool": "global_avg", "pool_options": {"size": 3}}, "head pool 'global_avg': options"),
    ({"pool": "none", "pool_options": {"kernel_size": 2}}, "takes no options"),
    ({"pool": "max", "pool_options": {"kernel_size": 9}}, "does not fit pooled features"),
    ({"pool": "stochastic", "pool_options": {"kernel_size": 8}}, "must fit in the input"),
    ({"conv_dims": (0,)}, r"conv_dims\[0\] must be >= 1, got 0"),
    ({"fc_dims": (16, -1)}, r"fc_dims\[1\] must be >= 1, got -1"),
    ({"fc_dims": (16, 2.0)}, r"fc_dims\[1\] must be an int, got 2.0"),
])
def test_head_errors_name_what_is_wrong(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FastRCNNConvFCHead(input_shape=(6, 7, 7), **kwargs)


def test_vector_features_take_no_head_pool():
    with pytest.raises(ValueError, match=r"already vectors; they take no conv_dims and no head pool"):
        FastRCNNConvFCHead(input_shape=(40,), pool="global_avg")


def _tiny_cfg(*overrides):
    return load_config(REPO / "configs" / "base_shapes.yaml", [
        "model.num_classes=3", "model.backbone.channels=[8,8,8,16]", "model.transform.min_size=96",
        "model.transform.max_size=96", *overrides])


@pytest.mark.parametrize("pool, options, fc_dims, conv_dims", [
    ("global_avg", {}, [], [16]),
    ("global_max", {}, [16], []),
    ("overlapping_max", {}, [16], []),
    ("stochastic", {"kernel_size": 2, "stride": 2}, [16], []),
    ("bilinear", {}, [16], []),
    ("compact_bilinear", {"output_dim": 128}, [16], []),
    ("spp", {"levels": [1, 2]}, [16], []),
])
def test_detector_trains_and_predicts_with_each_head_pool(pool, options, fc_dims, conv_dims):
    cfg = _tiny_cfg(f"model.box_head.pool={pool}", f"model.box_head.pool_options={json.dumps(options)}",
                    f"model.box_head.fc_dims={fc_dims}", f"model.box_head.conv_dims={conv_dims}")
    torch.manual_seed(0)
    model = build_detector(cfg)
    head = model.roi_heads.box_head
    assert head.pool == pool and model.roi_heads.box_predictor.cls_score.in_features == head.out_features
    images = [torch.rand(3, 96, 96), torch.rand(3, 80, 96)]
    targets = [{"boxes": torch.tensor([[10.0, 10.0, 50.0, 60.0]]), "labels": torch.tensor([2])},
               {"boxes": torch.tensor([[5.0, 20.0, 30.0, 40.0], [40.0, 40.0, 90.0, 70.0]]),
                "labels": torch.tensor([1, 3])}]
    losses = model(images, targets)
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    first = next(p for p in head.parameters())  # the first conv or fc weight: the gradient got through the pool
    assert first.grad is not None and first.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        out = model(images)
    assert len(out) == 2 and out[0]["boxes"].shape[1] == 4


def test_head_pool_config_errors():
    cfg = _tiny_cfg()
    with pytest.raises(ValueError, match=r"model.box_head: head pool must be one of"):
        build_detector(apply_overrides(cfg, ["model.box_head.pool=median"]))
    with pytest.raises(ValueError, match=r"did you mean 'model.box_head.pool_options'"):
        apply_overrides(cfg, ["model.box_head.pool_option={}"])
    # pool_options replace as a whole (one layer's settings make no sense for another)
    cfg = apply_overrides(cfg, ["model.box_head.pool_options={output_dim: 64}",
                                "model.box_head.pool_options={levels: [1]}"])
    assert cfg["model"]["box_head"]["pool_options"] == {"levels": [1]}


def test_checkpoint_from_before_the_head_pool_settings_still_loads(tmp_path):
    """A checkpoint whose saved config predates ``box_head.conv_dims/pool/pool_options`` reads them as defaults."""
    from roikit.engine import load_checkpoint, read_checkpoint

    cfg = _tiny_cfg("model.box_head.fc_dims=[16]")
    torch.manual_seed(0)
    model = build_detector(cfg)
    old = json.loads(json.dumps(cfg))
    old["model"]["box_head"] = {"fc_dims": [16]}  # what tools/train.py saved before the head pool existed
    path = tmp_path / "old.pth"
    torch.save({"model": model.state_dict(), "config": old, "iteration": 7}, path)
    assert read_checkpoint(path)["config"]["model"]["box_head"] == cfg["model"]["box_head"]
    assert load_checkpoint(path, model=build_detector(cfg), cfg=cfg) == 7
    # a real difference is still an error
    other = apply_overrides(cfg, ["model.box_head.pool=global_avg"])
    with pytest.raises(ValueError, match=r"another model config \(model.box_head.pool: checkpoint 'none', "
                                         r"config 'global_avg'\)"):
        load_checkpoint(path, model=build_detector(other), cfg=other)
