"""DenseCL and MoCo v2: loss parity with the paper's formulas, the identity check of the dense
correspondence, neck sizes and init, the queues (FIFO, wrap, unit rows, keys of every rank),
the momentum encoder really computing the keys, shuffle-BN inverted exactly, recipe schedules,
the unlabelled-images source, and the correspondence picture."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from densecl.loss import dense_correspondence, dense_loss, densecl_loss, info_nce
from densecl.model import DenseCL, DenseCLModelConfig, Neck
from densecl.train import Config, build
from shared import dist
from shared.config import BackboneConfig, build_config
from shared.engine import StepContext
from shared.errors import ConfigError
from shared.models import count_parameters
from shared.optim import apply_schedule, build_optimizer, ema_momentum, param_groups

from conftest import ROOT, run_cli, run_distributed

CONFIGS = ROOT / "densecl/configs"


def recipe(name: str, *overrides: str) -> Config:
    return build_config(Config, [CONFIGS / f"{name}.yaml"], ["data.root=/data", *overrides])


def unit(*shape, gen, dim=-1, dtype=torch.float64):
    return F.normalize(torch.randn(*shape, generator=gen, dtype=dtype), dim=dim)


# ------------------------------------------------------------------------------------------ loss
def reference_info_nce(q, k, neg, t):
    """-mean_i log( e^{q_i.k_i/t} / (e^{q_i.k_i/t} + sum_j e^{q_i.n_j/t}) ), written out."""
    total = 0.0
    for i in range(q.shape[0]):
        pos = torch.exp(torch.dot(q[i], k[i]) / t)
        negs = sum(torch.exp(torch.dot(q[i], n) / t) for n in neg)
        total = total - torch.log(pos / (pos + negs))
    return total / q.shape[0]


@pytest.mark.parametrize("m,kq,t", [(6, 10, 0.2), (4, 3, 1.0)])
def test_info_nce_loss_and_gradients_match_the_formula(m, kq, t):
    g = torch.Generator().manual_seed(m)
    q, k, neg = unit(m, 8, gen=g), unit(m, 8, gen=g), unit(kq, 8, gen=g)
    q1, q2 = q.clone().requires_grad_(), q.clone().requires_grad_()
    ours, ref = info_nce(q1, k, neg, t), reference_info_nce(q2, k, neg, t)
    ours.backward()
    ref.backward()
    assert torch.allclose(ours, ref, rtol=1e-10)
    assert torch.allclose(q1.grad, q2.grad, rtol=1e-9, atol=1e-12)


def test_dense_loss_matches_a_per_cell_reference_and_lambda_weights():
    g = torch.Generator().manual_seed(3)
    n, c, cells, kq, t = 3, 8, 4, 5, 0.2
    q_grid, k_grid = unit(n, c, cells, gen=g, dim=1).requires_grad_(), unit(n, c, cells, gen=g, dim=1)
    match = torch.randint(0, cells, (n, cells), generator=g)
    neg = unit(kq, c, gen=g)
    ours = dense_loss(q_grid, k_grid, match, neg, t)
    rows_q = torch.stack([q_grid[b, :, i] for b in range(n) for i in range(cells)])
    rows_k = torch.stack([k_grid[b, :, match[b, i]] for b in range(n) for i in range(cells)])
    ref = reference_info_nce(rows_q, rows_k, neg, t)
    assert torch.allclose(ours, ref, rtol=1e-10)
    g1, = torch.autograd.grad(ours, q_grid)
    g2, = torch.autograd.grad(ref, q_grid)
    assert torch.allclose(g1, g2, rtol=1e-9, atol=1e-12)
    q, k = unit(n, c, gen=g), unit(n, c, gen=g)
    total, single, dense = densecl_loss(q, k, neg, q_grid, k_grid, match, neg, t, 0.3)
    assert torch.allclose(single, 0.7 * reference_info_nce(q, k, neg, t), rtol=1e-10)
    assert torch.allclose(dense, 0.3 * ref, rtol=1e-10)
    assert torch.allclose(total, single + dense)


def test_dense_correspondence_is_the_argmax_of_backbone_cosine_similarity():
    g = torch.Generator().manual_seed(4)
    qf, kf = torch.randn(2, 16, 3, 3, generator=g), torch.randn(2, 16, 3, 3, generator=g)
    idx = dense_correspondence(qf, kf)
    assert idx.shape == (2, 9) and idx.dtype == torch.long
    for b in range(2):
        for i in range(9):
            sims = [F.cosine_similarity(qf[b].flatten(1)[:, i], kf[b].flatten(1)[:, j], dim=0) for j in range(9)]
            assert idx[b, i] == int(torch.stack(sims).argmax())
    # a permuted key map is matched back exactly
    perm = torch.randperm(9, generator=g)
    assert torch.equal(dense_correspondence(qf, qf.flatten(2)[:, :, perm]), torch.argsort(perm).expand(2, 9))


# ----------------------------------------------------------------------------------------- model
def tiny_model(neck="densecl", queue_len=16, batch=4, lam=0.5, **kw) -> DenseCL:
    torch.manual_seed(0)
    cfg = DenseCLModelConfig(backbone=BackboneConfig("resnet18"), neck=neck, hidden_dim=32, dim=8,
                             queue_len=queue_len, loss_lambda=lam if neck == "densecl" else 0.0, **kw)
    return DenseCL(cfg, batch)


def ctx(m=0.99, step=0):
    return StepContext(step, 0, 1, 1, 1.0, m, 4, 1)


def test_identity_every_cell_matches_itself_and_the_dense_positive_is_one_over_t():
    model = tiny_model()     # the momentum encoder starts as an exact copy
    x = torch.randn(2, 3, 96, 96)
    q_map = model.c5(model.backbone, x)
    k_map, k, k_grid, k_pool = model.keys(x)
    assert q_map.shape == (2, 512, 3, 3) and k_grid.shape == (2, 8, 9) and k_pool.shape == (2, 8)
    match = dense_correspondence(q_map, k_map)
    assert torch.equal(match, torch.arange(9).expand(2, 9))
    _, q_grid, _ = model.neck(q_map)
    pos = (F.normalize(q_grid, dim=1) * k_grid.gather(2, match.unsqueeze(1).expand(-1, 8, -1))).sum(1)
    assert torch.allclose(pos / 0.2, torch.full_like(pos, 1 / 0.2), atol=1e-5)


def test_neck_parameter_counts_and_init():
    assert count_parameters(Neck(2048, 2048, 128, dense=True)) == 8_917_248
    assert count_parameters(Neck(2048, 2048, 128, dense=False)) == 4_458_624
    torch.manual_seed(0)
    neck = Neck(2048, 2048, 128, dense=True)
    w = neck.mlp[0].weight
    assert abs(w.std().item() - math.sqrt(2 / 2048)) < 2e-3 and neck.mlp[0].bias.abs().max() == 0   # kaiming fan_in
    conv = neck.mlp2[0].weight    # PyTorch's default conv init: U(+-1/sqrt(fan_in)) (kaiming-uniform a=sqrt 5)
    assert conv.abs().max() <= 1 / math.sqrt(2048) + 1e-6 and neck.mlp2[0].bias.abs().max() > 0
    model = DenseCL(recipe("densecl_imagenet_200ep").model, 256)
    assert count_parameters(model.backbone) == 23_508_032
    assert count_parameters(model, trainable_only=True) == 23_508_032 + 8_917_248
    assert model.queue.shape == model.queue_dense.shape == (65536, 128)
    c1 = model.backbone.conv1.weight      # OpenSelfSup: kaiming-normal fan_in (torchvision: fan_out)
    assert abs(c1.std().item() - math.sqrt(2 / (3 * 49))) < 0.01
    assert model.backbone.layer1[0].bn3.weight.min() == 1     # no zero-init residual
    v2 = DenseCL(recipe("mocov2_imagenet_200ep").model, 256)
    assert count_parameters(v2, trainable_only=True) == 23_508_032 + 4_458_624 and not hasattr(v2, "queue_dense")


def test_forward_shapes_loss_terms_and_lambda_warmup():
    model = tiny_model(lambda_warmup_steps=2)
    x = torch.randn(4, 3, 64, 64), torch.randn(4, 3, 64, 64)
    out = model((x, None), ctx(step=0))
    assert out["loss_dense"] == 0 and torch.allclose(out["loss"], out["loss_single"])
    out = model((x, None), ctx(step=2))
    assert out["loss_dense"] > 0 and torch.allclose(out["loss"], out["loss_single"] + out["loss_dense"])
    out["loss"].backward()
    assert all(p.grad is None for p in model.momentum_backbone.parameters())
    assert model.neck.mlp2[0].weight.grad.abs().sum() > 0
    # the uniform-logit value of the global term at initialisation is near ln(queue + 1)
    assert abs(out["loss_single"].item() / 0.5 - math.log(17)) < 1.5


def test_queues_are_fifo_wrap_and_keep_unit_rows():
    model = tiny_model(queue_len=8, batch=4)
    assert torch.allclose(model.queue.norm(dim=1), torch.ones(8))
    a, b, c = (F.normalize(torch.randn(4, 8), dim=1) for _ in range(3))
    model.enqueue("queue", a)
    assert torch.equal(model.queue[:4], a) and int(model.queue_ptr) == 4
    model.enqueue("queue", b)
    assert torch.equal(model.queue, torch.cat([a, b])) and int(model.queue_ptr) == 0
    model.enqueue("queue", c)
    assert torch.equal(model.queue, torch.cat([c, b])) and int(model.queue_ptr) == 4
    model((tuple(torch.randn(4, 3, 64, 64) for _ in range(2)), None), ctx())
    for q in (model.queue, model.queue_dense):
        assert torch.allclose(q.norm(dim=1), torch.ones(8), atol=1e-6)
    with pytest.raises(ConfigError, match="queue_len=10 must be a positive multiple of the global batch"):
        tiny_model(queue_len=10, batch=4)


def test_keys_come_from_the_momentum_encoder_not_the_online_one():
    model = tiny_model(queue_len=4, batch=4)
    with torch.no_grad():               # make the online encoder differ from its momentum copy
        for p in model.backbone.parameters():
            p.add_(0.5 * torch.randn_like(p))
    calls = {"online": 0, "momentum": 0}
    model.backbone.register_forward_hook(lambda *_: calls.__setitem__("online", calls["online"] + 1))
    model.momentum_backbone.register_forward_hook(lambda *_: calls.__setitem__("momentum", calls["momentum"] + 1))
    xq, xk = torch.randn(4, 3, 64, 64), torch.randn(4, 3, 64, 64)
    model.eval()    # BN on running statistics: keys depend on nothing but the encoder and the image
    model(((xq, xk), None), ctx(m=1.0))   # m = 1: the momentum encoder keeps its own weights
    with torch.no_grad():
        expect = F.normalize(model.momentum_neck(model.c5(model.momentum_backbone, xk))[0], dim=1)
        online = F.normalize(model.neck(model.c5(model.backbone, xk))[0], dim=1)
    assert torch.allclose(model.queue, expect, atol=1e-6)
    assert not torch.allclose(model.queue, online, atol=1e-2)


def test_momentum_update_before_the_keys_and_constant_schedule():
    model = tiny_model(queue_len=4, batch=4)
    with torch.no_grad():
        for p in model.backbone.parameters():
            p.add_(1.0)
    before = [p.clone() for p in model.momentum_backbone.parameters()]
    model((tuple(torch.randn(4, 3, 64, 64) for _ in range(2)), None), ctx(m=0.9))
    for p0, pm, po in zip(before, model.momentum_backbone.parameters(), model.backbone.parameters()):
        assert torch.allclose(pm, 0.9 * p0 + 0.1 * po, atol=1e-6)
    cfg = recipe("densecl_imagenet_200ep")
    assert [ema_momentum(s, 5004, 200, cfg.sched) for s in (0, 500_000, 5004 * 200 - 1)] == [0.999] * 3


def test_lr_is_cosine_per_epoch_without_warmup():
    cfg = recipe("densecl_imagenet_200ep")
    model = nn.Linear(2, 2)
    opt = build_optimizer(param_groups(model, cfg.optim, 256), cfg.optim)
    spe = 5004

    def lr(step):
        apply_schedule(opt, step, spe, 200, cfg.sched)
        return opt.param_groups[0]["lr"]

    assert lr(0) == pytest.approx(0.03) and lr(spe - 1) == pytest.approx(0.03)
    assert lr(100 * spe + 7) == pytest.approx(0.015)
    assert lr(199 * spe) == pytest.approx(0.5 * 0.03 * (1 + math.cos(math.pi * 199 / 200)))
    assert opt.param_groups[0]["weight_decay"] == 1e-4 and len(opt.param_groups) == 1   # wd on every parameter
    coco = recipe("densecl_coco_800ep")
    assert coco.optim.lr == 0.3 and coco.train.epochs == 800 and coco.data.source == "images"
    assert coco.eval.after_train == []


def test_recipes_match_the_official_configs():
    for name in ("densecl_imagenet_200ep", "mocov2_imagenet_200ep", "densecl_coco_800ep", "mocov2_coco_800ep"):
        cfg = recipe(name)
        assert cfg.train.batch_size == 256 and not cfg.train.sync_bn
        assert (cfg.model.temperature, cfg.model.queue_len, cfg.model.dim) == (0.2, 65536, 128)
        assert cfg.optim.name == "sgd" and cfg.optim.momentum == 0.9 and cfg.optim.weight_decay == 1e-4
        for v in cfg.aug.views:
            assert tuple(v.crop_scale) == (0.2, 1.0) and tuple(v.jitter) == (0.4, 0.4, 0.4, 0.1)
            assert (v.jitter_p, v.gray_p, v.blur_p, v.solarize_p, v.flip_p) == (0.8, 0.2, 0.5, 0.0, 0.5)
            assert v.order == ["crop", "jitter", "gray", "blur", "flip"]
        assert cfg.model.loss_lambda == (0.0 if name.startswith("mocov2") else 0.5)
    with pytest.raises(ConfigError, match="mocov2 neck has no dense branch"):
        DenseCL(recipe("mocov2_imagenet_200ep", "model.loss_lambda=0.5").model, 256)


# --------------------------------------------------------------------------------- 2 processes
def _two_process_queue_and_shuffle(rank, world):
    from shared import dist
    model = tiny_model(queue_len=8, batch=4)
    g = torch.Generator().manual_seed(5)
    keys = F.normalize(torch.randn(4, 8, generator=g), dim=1)
    model.enqueue("queue", keys[rank * 2:(rank + 1) * 2])     # each rank holds 2 of the global 4
    x = torch.arange(8 * 3, dtype=torch.float32).view(8, 3)
    mine = x[rank * 4:(rank + 1) * 4]
    shuffled, inverse = dist.shuffle_batch(mine)
    back = dist.unshuffle_batch(shuffled * 10, inverse)
    # the model's keys with shuffle-BN, BN on running statistics: independent of the batch mix
    model.eval()
    imgs = torch.randn(8, 3, 64, 64, generator=g)[rank * 4:(rank + 1) * 4]
    k = model.keys(imgs)[1]
    return model.queue.clone(), int(model.queue_ptr), shuffled, back, k


@pytest.mark.dist
def test_two_process_enqueue_gathers_every_rank_and_shuffle_bn_is_inverted(tmp_path):
    results = run_distributed(_two_process_queue_and_shuffle, 2, tmp_path)
    g = torch.Generator().manual_seed(5)
    keys = F.normalize(torch.randn(4, 8, generator=g), dim=1)
    for queue, ptr, _, _, _ in results:
        assert torch.equal(queue[:4], keys) and ptr == 4
    assert torch.equal(results[0][0], results[1][0])
    x = torch.arange(8 * 3, dtype=torch.float32).view(8, 3)
    both = torch.cat([results[0][2], results[1][2]])
    assert sorted(both[:, 0].tolist()) == x[:, 0].tolist()          # a permutation of the global batch
    assert not torch.equal(both, x)                                 # (not the identity, for this seed)
    for r in range(2):
        assert torch.equal(results[r][3], x[r * 4:(r + 1) * 4] * 10)  # every rank gets its own rows back
    model = tiny_model(queue_len=8, batch=4).eval()
    imgs = torch.randn(8, 3, 64, 64, generator=g)
    single = model.keys(imgs)[1]
    assert torch.allclose(torch.cat([results[0][4], results[1][4]]), single, atol=1e-5)


# ------------------------------------------------------------------------------- end to end, data
def test_demo_recipe_runs_and_the_picture_is_written(tmp_path):
    run = tmp_path / "run"
    r = run_cli(["densecl/train.py", "--config", str(CONFIGS / "demo.yaml"), "data.synthetic.length=64",
                 "data.synthetic.val_length=32", "data.workers=0", "train.batch_size=16", "model.queue_len=32",
                 "model.hidden_dim=32", "train.epochs=2", "eval.after_train=[knn]", "eval.compare_random_init=false",
                 "train.tensorboard=false", f"train.out_dir={run}"])
    assert r.returncode == 0, r.stderr[-2000:]
    state = torch.load(run / "last.pt", weights_only=True)
    assert state["step"] == 8 and "queue_dense" in state["model"]
    import torchvision     # the exported backbone is a torchvision ResNet-18 state dict (no fc)
    missing, unexpected = torchvision.models.resnet18().load_state_dict(
        torch.load(run / "backbone.pt", weights_only=True), strict=False)
    assert sorted(missing) == ["fc.bias", "fc.weight"] and not unexpected
    r = run_cli(["densecl/show_matches.py", str(run / "last.pt"), "--pairs", "2"])
    assert r.returncode == 0, r.stderr[-2000:]
    from PIL import Image
    img = Image.open(run / "matches.png")
    assert img.size[0] > 2 * 64 and img.size[1] >= 2 * 64


def test_match_curves_join_the_cell_centres_and_bow_apart():
    from densecl.show_matches import arc
    a, b = (10.0, 50.0), (110.0, 50.0)                # two cells on one grid row, 100 px apart
    pts = arc(a, b, bow=0.2)
    assert pts[0] == pytest.approx(a) and pts[-1] == pytest.approx(b)
    # the quadratic curve's midpoint lies half the control offset (0.2 x 100 px) off the straight line
    assert pts[len(pts) // 2] == pytest.approx((60.0, 40.0))
    # a shorter match along the same row bows less, so the two no longer overlap
    assert arc(a, (60.0, 50.0), bow=0.2)[12][1] == pytest.approx(45.0)


def test_unlabelled_images_source(tmp_path):
    from PIL import Image
    from shared.config import DataConfig
    from shared.data.loader import build_image_dataset
    for i, sub in enumerate(["a", "a/b", "c"]):
        (tmp_path / "train2017" / sub).mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), (i * 50, 0, 0)).save(tmp_path / "train2017" / sub / f"{i}.jpg")
    (tmp_path / "train2017" / "notes.txt").write_text("not an image")
    ds = build_image_dataset(DataConfig(source="images", root=str(tmp_path), train_dir="train2017"), "train")
    assert len(ds) == 3 and ds.classes == [] and ds[1][1] == -1 and ds[0][0].size == (8, 8)
    r = run_cli(["densecl/train.py", "--config", str(CONFIGS / "densecl_coco_800ep.yaml"), f"data.root={tmp_path}",
                 "eval.after_train=[knn]", f"train.out_dir={tmp_path / 'run'}"])
    assert r.returncode != 0 and "needs class labels" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------- per-GPU BN in one process
def test_split_batchnorm_normalises_each_group_with_its_own_statistics():
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(3)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2.0)
        bn.bias.uniform_(-1.0, 1.0)
    split = dist.convert_split_batchnorm(copy.deepcopy(bn), 4)
    assert isinstance(split, dist.SplitBatchNorm) and split.state_dict().keys() == bn.state_dict().keys()
    x = torch.randn(8, 3, 5, 5, requires_grad=True) * 3 + 1
    out = split(x)
    # reference: group j holds samples j and j + 4; each normalised alone (biased variance)
    expect = torch.empty_like(out)
    means, vars_ = [], []
    for j in range(4):
        xs = x[j::4]
        mean, var = xs.mean((0, 2, 3)), xs.var((0, 2, 3), unbiased=False)
        expect[j::4] = ((xs - mean.view(1, 3, 1, 1)) / torch.sqrt(var.view(1, 3, 1, 1) + 1e-5)
                        * bn.weight.view(1, 3, 1, 1) + bn.bias.view(1, 3, 1, 1))
        means.append(mean)
        vars_.append(xs.var((0, 2, 3), unbiased=True))
    assert torch.allclose(out, expect, atol=1e-5)
    g1, = torch.autograd.grad(out.square().sum(), x)
    g2, = torch.autograd.grad(expect.square().sum(), x)
    assert torch.allclose(g1, g2, atol=1e-4)
    assert torch.allclose(split.running_mean, 0.9 * torch.zeros(3) + 0.1 * torch.stack(means).mean(0), atol=1e-6)
    assert torch.allclose(split.running_var, 0.9 * torch.ones(3) + 0.1 * torch.stack(vars_).mean(0), atol=1e-5)
    split.eval()
    bn.load_state_dict(split.state_dict())
    bn.eval()
    assert torch.equal(split(x), bn(x))          # eval: a plain BatchNorm
    with pytest.raises(ValueError, match="6 does not split into 4"):
        split.train()(torch.randn(6, 3, 2, 2))


def test_bn_splits_keys_are_shuffled_across_groups_and_returned_in_order():
    model = tiny_model(batch=4, bn_splits=2)
    assert all(isinstance(m, dist.SplitBatchNorm) for m in model.momentum_backbone.modules()
               if isinstance(m, nn.modules.batchnorm._BatchNorm))
    x = torch.randn(4, 3, 64, 64)
    torch.manual_seed(3)
    k_map, k, k_grid, k_pool = model.keys(x)
    # reference: the same permutation, the key encoder on the permuted batch, rows put back
    torch.manual_seed(3)
    perm = torch.randperm(4)
    ref = copy.deepcopy(model.momentum_backbone)
    fmap = ref.forward_intermediates(x[perm], [3])[0]
    fmap_back = fmap[torch.argsort(perm)]
    assert torch.allclose(k_map, F.normalize(fmap_back.flatten(2), dim=1), atol=1e-5)
    assert not torch.equal(perm, torch.arange(4))
    # the seed gives other groups than the unshuffled batch's ({0, 2}, {1, 3}), and then the keys differ
    assert set(perm[::2].tolist()) not in ({0, 2}, {1, 3})
    plain = copy.deepcopy(model.momentum_backbone).forward_intermediates(x, [3])[0]
    assert not torch.allclose(fmap_back, plain, atol=1e-3)
    with pytest.raises(ConfigError, match="bn_splits=3 must be a positive divisor of the per-process batch 4"):
        tiny_model(batch=4, bn_splits=3)


def test_bn_splits_and_sync_bn_together_are_a_config_error():
    cfg = recipe("demo", "model.bn_splits=4", "train.sync_bn=true")
    with pytest.raises(ConfigError, match="model.bn_splits=4 asks for per-group BatchNorm and train.sync_bn=true"):
        build(cfg)
